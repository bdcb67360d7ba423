"""The record of a training stage (`<workdir>/<stage>/run.json`): the config fields that
decide what the stage computes and the identity of its data file and of its models' files
(router base and experts, or stage lm's init model), written when the stage first starts.
A re-run resumes the stage only if they are unchanged; otherwise it stops with the list of
differences, or, with `train.accept_changes=True`, records them (with the time) beside the
original and goes on. `<workdir>/config.json` keeps the first run's full config; it is
never overwritten. (Stages are records of their own: `sft` then `cdpo` from the SFT
router, as two commands on one workdir, is one run.) A start that would lose or mix
checkpoints is refused before anything is written (`check_start`)."""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import time
from typing import Dict, List, Optional

from fr_jax.hf.hub import CHECKPOINT_FILES, checkpoint_dir
from fr_jax.runtime.errors import TrainError
from fr_jax.runtime.paths import write_atomic

# Fields that change what a stage computes (its own train.<stage>.* fields are added). The
# rest (logging, evaluation and checkpoint cadence, progress, memory layout knobs such as
# loss_block, the caches' paths) may change on a resume.
RUN_FIELDS = ("router.path", "experts.paths", "model.", "data.seq_len", "data.pack",
              "data.chat", "data.seed", "data.eval_fraction", "train.batch_size",
              "train.grad_accum", "train.seed", "train.clip", "train.weight_decay", "train.b1",
              "train.b2")
_NOT_RUN = ("train.sft.signals_cache", "train.cdpo.reference_cache")
DATA_FIELD = {"sft": "sft_path", "lm": "sft_path", "cdpo": "pref_path"}


def _flat(d, prefix="") -> Dict[str, object]:
    out = {}
    for k, v in d.items():
        key = prefix + k
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = list(v) if isinstance(v, tuple) else v
    return out


def _data_identity(path: str) -> dict:
    """Size and SHA-256 of a data file; for a saved datasets folder, of its files' names and
    sizes."""
    if not path or not os.path.exists(path):
        return {"missing": True}
    h = hashlib.sha256()
    if os.path.isdir(path):
        for root, _, files in sorted(os.walk(path)):
            for f in sorted(files):
                p = os.path.join(root, f)
                h.update(f"{os.path.relpath(p, path)}:{os.path.getsize(p)}\n".encode())
        return {"folder": True, "sha256": h.hexdigest()}
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return {"bytes": os.path.getsize(path), "sha256": h.hexdigest()}


# A model file up to this size is hashed in full (SHA-256 reads about 1 GB/s here, so a
# lineup of 8B models, 50-60 GB, would add a minute to every start). A larger one is
# identified by its size, its safetensors header (every tensor's name, dtype, shape and
# byte offsets) and _SAMPLES evenly spaced 1 MiB slices of its bytes: any other model
# (another fine-tune, another export) differs in every slice, but an edit confined to a
# small tensor between two slices would pass unnoticed.
FULL_HASH_BYTES = 256 << 20
_SAMPLES, _SLICE = 64, 1 << 20
_MODEL_FILES = CHECKPOINT_FILES + ("*.jinja",)  # the files fr_jax reads of a checkpoint


def _file_identity(path: str) -> str:
    size = os.path.getsize(path)
    h = hashlib.sha256(f"{size}\n".encode())
    with open(path, "rb") as f:
        if size <= FULL_HASH_BYTES:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
            return h.hexdigest()
        if path.endswith(".safetensors"):
            n = int.from_bytes(f.read(8), "little")
            h.update(f.read(min(n, size - 8, 100 << 20)))  # the format's header limit
        for i in range(_SAMPLES):
            f.seek((size - _SLICE) * i // (_SAMPLES - 1))
            h.update(f.read(_SLICE))
    return "sampled:" + h.hexdigest()


def model_identity(name: str, folder: Optional[str] = None) -> dict:
    """The identity of a checkpoint folder's contents: one hash over its checkpoint files'
    names and `_file_identity`s (a hub name: its cached snapshot's; `folder`: that local
    folder, when the entry point resolved it already)."""
    folder = folder or checkpoint_dir(name)
    if not os.path.isdir(folder):
        return {"path": name, "missing": True}
    h, sampled = hashlib.sha256(), False
    for f in sorted(os.listdir(folder)):
        p = os.path.join(folder, f)
        if os.path.isfile(p) and any(fnmatch.fnmatch(f, pat) for pat in _MODEL_FILES):
            ident = _file_identity(p)
            sampled |= ident.startswith("sampled:")
            h.update(f"{f}:{ident}\n".encode())
    return {"path": name, "sha256": h.hexdigest(), **({"sampled": True} if sampled else {})}


def checkpoint_fields(config, lm: bool) -> Dict[str, str]:
    """{config field: checkpoint name} of the models a run reads: stage lm's init model, or
    the router and each expert."""
    if lm:
        return {"train.lm.init": config.train.lm.init}
    return {"router.path": config.router.path,
            **{f"experts.paths[{i}]": p for i, p in enumerate(config.experts.paths)}}


def _models(config, stage: str, folders: Dict[str, str]) -> Dict[str, dict]:
    return {field: model_identity(name, folders.get(field))
            for field, name in checkpoint_fields(config, stage == "lm").items()}


def describe(config, stage: str, folders: Optional[Dict[str, str]] = None) -> dict:
    """What a resume of `stage` must find unchanged: its fields, its data file and its
    models' files (`folders`: {config field: local folder} of the checkpoints resolved
    already)."""
    flat = _flat(config.to_dict())
    prefixes = RUN_FIELDS + (f"data.{DATA_FIELD[stage]}", f"train.{stage}.")
    if stage == "lm":
        prefixes = tuple(p for p in prefixes if p not in ("router.path", "experts.paths"))
    fields = {k: v for k, v in sorted(flat.items())
              if k.startswith(prefixes) and k not in _NOT_RUN}
    key = DATA_FIELD[stage]
    return {"fields": json.loads(json.dumps(fields, default=str)),
            "data": {key: _data_identity(config.data[key])},
            "models": _models(config, stage, folders or {})}


def differences(before: dict, now: dict) -> List[str]:
    out = []
    for key in sorted(set(before["fields"]) | set(now["fields"])):
        a, b = before["fields"].get(key, "(unset)"), now["fields"].get(key, "(unset)")
        if a != b:
            out.append(f"{key}: {a!r} -> {b!r}")
    for key in sorted(set(before["data"]) | set(now["data"])):
        if before["data"].get(key) != now["data"].get(key):
            out.append(f"the contents of data.{key} ({now['fields'].get('data.' + key)!r}) "
                       "changed")
    # A record from before models were fingerprinted has none: nothing to compare. A model
    # at another path is already a changed field.
    was, now_m = before.get("models", {}), now.get("models", {})
    for key in sorted(set(was) & set(now_m)):
        if was[key]["path"] == now_m[key]["path"] and was[key] != now_m[key]:
            out.append(f"the contents of {key} ({now_m[key]['path']!r}) changed")
    return out


def checkpoint_steps(folder: str) -> List[int]:
    """The complete steps of an Orbax checkpoint folder (a step being written is a
    temporary folder, not a number)."""
    if not os.path.isdir(folder):
        return []
    return sorted(int(d) for d in os.listdir(folder)
                  if d.isdigit() and os.path.isdir(os.path.join(folder, d)))


def _spans(steps: List[int]) -> str:
    return f"step {steps[0]}" if len(steps) == 1 else f"steps {steps[0]}..{steps[-1]}"


def resume_upto(config, stage: str):
    """The step `stage` resumes from when train.resume_step is set and applies to it (else
    None): to the first stage of train.stages that is not finished (the one that stopped;
    the stages before it resume from their newest as always), or to the last when all are."""
    tc = config.train
    if not tc.resume_step:
        return None
    target = tc.stages[-1]
    for s in tc.stages:
        steps = checkpoint_steps(os.path.join(tc.workdir, s, "checkpoints"))
        if not steps or steps[-1] < tc[s].steps:
            target = s
            break
    return tc.resume_step if stage == target else None


def check_start(config, stage: str):
    """Refuses, before anything is read or written, a start that would lose or mix
    checkpoints: train.resume=False over a stage's checkpoints (the new run's first save
    collides with them, and a later plain re-run would resume the old one), or a
    train.resume_step the stage has no checkpoint of."""
    tc = config.train
    folder = os.path.join(tc.workdir, stage)
    steps = checkpoint_steps(os.path.join(folder, "checkpoints"))
    if steps and not tc.resume:
        raise TrainError(
            f"{folder} holds {_spans(steps)} of a run of stage {stage}; train.resume=False "
            "would start another run over them. Use another --config.train.workdir for a "
            "new run, or delete that folder, or drop resume=False to resume it.")
    if resume_upto(config, stage) is not None and tc.resume_step not in steps:
        held = ", ".join(map(str, steps)) if steps else "none"
        raise TrainError(
            f"train.resume_step={tc.resume_step}: {os.path.join(folder, 'checkpoints')} has "
            f"no step {tc.resume_step} (it holds: {held}); give one of those, or 0 for the "
            "newest.")


def check_or_write(config, stage: str, is_main: bool = True, streams: int = 1,
                   folders: Optional[Dict[str, str]] = None) -> int:
    """Writes the stage's record on its first run; on a re-run (train.resume) checks it,
    raising TrainError with the differences unless train.accept_changes is set. Returns
    the stage's data stream count (fr_jax.corpus.streams): `streams` on a first run, the
    recorded one on a re-run (a run recorded before streams had one), so a resume on
    other hosts reads the same batches."""
    check_start(config, stage)
    tc = config.train
    path = os.path.join(tc.workdir, stage, "run.json")
    now = describe(config, stage, folders)
    if os.path.isfile(path) and tc.resume:
        with open(path) as f:
            record = json.load(f)
        recorded = int(record.get("streams", 1))
        asked = int(config.data.get("streams", 0) or 0)
        if asked and asked != recorded:
            raise TrainError(
                f"{os.path.join(tc.workdir, stage)} holds a run of stage {stage} whose data "
                f"is read as {recorded} streams; data.streams={asked} would change its "
                "batches. Drop the setting to resume (the recorded count is used), or use "
                "another --config.train.workdir for a new run.")
        changed = differences(record["run"], now)
        if changed and not tc.accept_changes:
            raise TrainError(
                f"{os.path.join(tc.workdir, stage)} holds a run of stage {stage} with other "
                "settings; resuming it with these would mix two runs: "
                + "; ".join(changed) + ". Use another --config.train.workdir for a new "
                "run, restore the settings, or add --config.train.accept_changes=True to "
                "resume with the changes (they are recorded in run.json).")
        if changed and is_main:
            record.setdefault("changes", []).append(
                {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "differences": changed, "run": now})
            write_json(path, record)
        return recorded
    if is_main:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write_json(path, {"run": now, "streams": streams,
                          "config": json.loads(config.to_json_best_effort())})
        original = os.path.join(tc.workdir, "config.json")
        if not os.path.isfile(original):
            write_atomic(original, config.to_json_best_effort(indent=2))
    return streams


def write_json(path, obj):
    """Writes `obj` as JSON to `path` atomically (a per-process temporary file, renamed)."""
    write_atomic(path, json.dumps(obj, indent=1))
