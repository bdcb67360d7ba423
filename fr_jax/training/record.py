"""The record of a training stage (`<workdir>/<stage>/run.json`): the config fields that
decide what the stage computes and the identity of its data file, written when the stage
first starts. A re-run resumes the stage only if they are unchanged; otherwise it stops with
the list of differences, or, with `train.accept_changes=True`, records them (with the time)
beside the original and goes on. `<workdir>/config.json` keeps the first run's full config;
it is never overwritten. (Stages are records of their own: `sft` then `cdpo` from the SFT
router, as two commands on one workdir, is one run.)"""

from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Dict, List

from fr_jax.errors import TrainError
from fr_jax.paths import write_atomic

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


def describe(config, stage: str) -> dict:
    """What a resume of `stage` must find unchanged: its fields and its data file."""
    flat = _flat(config.to_dict())
    prefixes = RUN_FIELDS + (f"data.{DATA_FIELD[stage]}", f"train.{stage}.")
    if stage == "lm":
        prefixes = tuple(p for p in prefixes if p not in ("router.path", "experts.paths"))
    fields = {k: v for k, v in sorted(flat.items())
              if k.startswith(prefixes) and k not in _NOT_RUN}
    key = DATA_FIELD[stage]
    return {"fields": json.loads(json.dumps(fields, default=str)),
            "data": {key: _data_identity(config.data[key])}}


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
    return out


def check_or_write(config, stage: str, is_main: bool = True, streams: int = 1) -> int:
    """Writes the stage's record on its first run; on a re-run (train.resume) checks it,
    raising TrainError with the differences unless train.accept_changes is set. Returns
    the stage's data stream count (fr_jax.data.streams): `streams` on a first run, the
    recorded one on a re-run (a run recorded before streams had one), so a resume on
    other hosts reads the same batches."""
    tc = config.train
    path = os.path.join(tc.workdir, stage, "run.json")
    now = describe(config, stage)
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
                "settings; resuming it with these would mix two runs:\n  "
                + "\n  ".join(changed) + "\nUse another --config.train.workdir for a new "
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
