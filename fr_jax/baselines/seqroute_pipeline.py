"""Sequence-level routing baseline (SharedTrunkNet, arXiv 2603.20895): the pipeline behind
`python -m fr_jax.seqroute` (`build` below). The model side -- encoder pooling, targets, the
net and the decode-time selector -- is fr_jax/routing/.

  1. labels: every target answers a labelled prompt set; each answer is scored (correct or
     not) and cached per target on disk, so a rerun decodes nothing twice;
  2. probes (probes.py): Fisher separability J and effective dimensionality d_eff per layer,
     on the training split; the layer rule picks the encoder layer;
  3. SharedTrunkNet (fr_jax/routing/trunk.py): a shared MLP trunk with one P(target
     correct) head per target, trained with binary cross-entropy on that layer's pooled
     activations;
  4. routing: per prompt argmax_t P(correct_t) - lam * cost_t (costs relative to the most
     expensive target), swept over lam on the held-out split: the accuracy-cost curve and
     the headline metrics (gap to the oracle captured, cost saved).
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from fr_jax.baselines import probes as P
from fr_jax.corpus import encode_prompt, jsonl_objects
from fr_jax.harness.generation import generate
from fr_jax.inference import left_pad
from fr_jax.models import Model, ModelConfig
from fr_jax.routing import trunk as T
from fr_jax.routing.modes import Mode
from fr_jax.routing.selector import META_FILE, default_targets, parse_targets, prefill_features
from fr_jax.runtime.errors import DataError


def encode_features(model: Model, params, prompts: Sequence[Sequence[int]], pad_id: int,
                    batch_size: int = 64, progress: bool = False) -> np.ndarray:
    """Token-id prompts -> pooled activations of every layer [L, N, 2E] (numpy float32).
    Batches are padded to `batch_size` rows and to a multiple of 16 tokens so the forward
    compiles a handful of times, not once per batch."""
    fn = jax.jit(lambda p, t, m: prefill_features(model, p, t, m))
    out = []
    bar = tqdm(total=len(prompts), desc="encode", disable=not progress)
    for lo in range(0, len(prompts), batch_size):
        part = list(prompts[lo:lo + batch_size])
        n = len(part)
        part += [part[0]] * (batch_size - n)
        tokens, mask = left_pad(part, pad_id)
        width = -(-tokens.shape[1] // 16) * 16
        tokens = np.pad(tokens, ((0, 0), (width - tokens.shape[1], 0)), constant_values=pad_id)
        mask = np.pad(mask, ((0, 0), (width - mask.shape[1], 0)))
        out.append(np.asarray(fn(params, jnp.asarray(tokens), jnp.asarray(mask)))[:, :n])
        bar.update(n)
    bar.close()
    return np.concatenate(out, axis=1)



# ---------------------------------------------------------------------------- labels
def _key(prompt: str) -> str:
    return hashlib.sha256(prompt.encode()).hexdigest()[:20]


def label_targets(lineup, targets: Sequence[str], tasks: Sequence[dict], scorer,
                  cache_dir: str, fingerprint: dict, max_new_tokens: int,
                  batch_size: int = 64, progress: bool = False) -> np.ndarray:
    """Runs each target over the labelled prompts and scores its answers -> (correct [N, T],
    routes {target: the expert of each generated token, per prompt}).

    tasks: [{"prompt", "answer"}]; scorer(answer, output) -> bool. Answers and their routing
    are cached per target in `cache_dir/<target>.jsonl` (a record of an older cache without
    routing gives None); `fingerprint` (the models and decode settings) is stored beside
    them, and a cache made with other models is an error, not reused.
    """
    os.makedirs(cache_dir, exist_ok=True)
    fp_path = os.path.join(cache_dir, "fingerprint.json")
    if os.path.isfile(fp_path):
        with open(fp_path) as f:
            old = json.load(f)
        if old != fingerprint:
            raise ValueError(f"the label cache {cache_dir} was made with other models or "
                             f"settings ({old}); delete it or set another workdir")
    else:
        with open(fp_path, "w") as f:
            json.dump(fingerprint, f, indent=1, sort_keys=True)
    correct = np.zeros((len(tasks), len(targets)), bool)
    routes = {}
    keys = [_key(t["prompt"]) for t in tasks]
    bar = tqdm(total=len(tasks) * len(targets), desc="label", disable=not progress)
    for j, target in enumerate(targets):
        path = os.path.join(cache_dir, target.replace(":", "_") + ".jsonl")
        cached, chosen = {}, {}
        if os.path.isfile(path):
            with open(path) as f:
                for line in f:
                    rec = json.loads(line)
                    cached[rec["key"]] = rec["output"]
                    chosen[rec["key"]] = rec.get("chosen")
        todo = [i for i, k in enumerate(keys) if k not in cached]
        bar.update(len(tasks) - len(todo))
        if todo:
            gen = generate(lineup, target, [tasks[i]["prompt"] for i in todo], max_new_tokens,
                           batch_size, progress=bar)
            with open(path, "a") as f:
                for i, text, row in zip(todo, gen.texts, gen.chosen):
                    cached[keys[i]], chosen[keys[i]] = text, [int(e) for e in row]
                    f.write(json.dumps({"key": keys[i], "output": text,
                                        "chosen": chosen[keys[i]]}) + "\n")
        correct[:, j] = [bool(scorer(t["answer"], cached[k])) for t, k in zip(tasks, keys)]
        routes[target] = [chosen.get(k) for k in keys]
    bar.close()
    return correct, routes


def param_count(tree) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def lazy_passes(chosen: Sequence[int], width: int) -> List[int]:
    """Per generated token, how many times the selected expert reads its weights under the
    lazy schedule (fr_jax.inference.lazy) at batch 1: once for the token, plus one pass per
    catch-up chunk of `width` over the tokens it missed since it last ran (every expert is
    in sync after the prompt)."""
    synced, out = {}, []
    for t, e in enumerate(chosen):
        behind = t - synced.get(e, 0)
        out.append(1 + -(-behind // width))
        synced[e] = t + 1
    return out


def default_costs(lineup, targets: Sequence[str], routes=None, lazy: bool = False,
                  width: int = 8) -> List[float]:
    """Weights read per generated token, in parameters, by the decoder as it runs: an
    expert alone reads its own. A routed target (FusionRoute, expert_only) reads the
    router's and, eagerly, every expert's; lazily (`lazy`, decode's default), the router's
    and the selected expert's, with its catch-up passes (`lazy_passes`) -- averaged over
    the labelled answers' routing, `routes[target]` (lists of experts per token; where no
    answer has routing, the selected expert counts once per token)."""
    experts = lineup.params["experts"]
    if lineup.experts.stacked:
        per = [param_count(experts) // lineup.experts.n] * lineup.experts.n
    else:
        per = [param_count(p) for p in experts]
    router = param_count(lineup.params["router"]) if lineup.router is not None else 0
    costs = []
    for t in targets:
        m = Mode.parse(t, lineup.experts.n)
        if m.fixed_expert is not None:
            costs.append(float(per[m.expert]))
        elif not lazy:
            costs.append(float(router + sum(per)))
        else:
            rows = [r for r in (routes or {}).get(t, []) if r]
            if rows:
                read = sum(sum(per[e] * k for e, k in zip(r, lazy_passes(r, width)))
                           for r in rows)
                costs.append(float(router + read / sum(len(r) for r in rows)))
            else:
                costs.append(float(router + sum(per) / len(per)))
    return costs


# ---------------------------------------------------------------------------- pipeline


def read_labelled(path: str) -> List[dict]:
    """Labelled prompts: JSONL with a string "prompt" and a reference "answer" (or
    "response", the SFT field) per line; an optional "domain" groups the report."""
    out = []
    for n, rec in jsonl_objects(path, "labelled prompts",
                                'one {"prompt": ..., "answer": ...} object per line'):
        answer = rec.get("answer", rec.get("response"))
        if not isinstance(answer, str) or not isinstance(rec.get("prompt"), str):
            raise DataError(f'{path}:{n}: expected string "prompt" and "answer" fields')
        out.append({"prompt": rec["prompt"], "answer": answer,
                    "domain": rec.get("domain", "all")})
    if not out:
        raise DataError(f"labelled prompts {path!r} is empty")
    return out


def split(n: int, test_fraction: float, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """Seeded train / test indices (the trunk and the layer rule never see the test part)."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    order = np.random.default_rng(seed).permutation(n)
    k = max(1, int(round(n * test_fraction)))
    return np.sort(order[k:]), np.sort(order[:k])


def build(lineup, tasks: Sequence[dict], s, workdir: str, encoder: Tuple[str, ModelConfig, dict],
          scorer, progress: bool = False, lazy: Optional[bool] = None) -> dict:
    """The whole SharedTrunkNet pipeline over a Lineup (labels -> probes -> trunk -> sweep).

    s: the `seqroute` config section (targets, costs, layer, probe_reg, trunk, lams, lam,
    test_fraction, max_new_tokens, batch_size, seed). encoder: (name, cfg, params) -- name
    "router" for the router's backbone, else the encoder's folder. Writes under `workdir`:
    labels/, probes.{json,md,png}, trunk/ (+ seqroute.json), report.{json,md}, sweep.png.
    Returns the report dict (also `report["trunk"]`, the trained Trunk). lazy: the schedule
    the costs count (default: the lineup's, `lineup.lazy_experts`; see default_costs).
    """
    n_exp = lineup.experts.n
    targets = list(s.targets) or default_targets(n_exp)
    parse_targets(targets, n_exp)
    if s.costs and (len(s.costs) != len(targets) or min(s.costs) <= 0):
        raise ValueError(f"seqroute.costs: expected {len(targets)} positive numbers (one per "
                         f"target {targets}), got {list(s.costs)}")
    os.makedirs(workdir, exist_ok=True)
    fingerprint = {"router": lineup.source.get("router"), "experts": lineup.source.get("experts"),
                   "max_new_tokens": int(s.max_new_tokens)}
    correct, routes = label_targets(lineup, targets, tasks, scorer,
                                    os.path.join(workdir, "labels"), fingerprint,
                                    s.max_new_tokens, s.batch_size, progress)
    lazy = lineup.lazy_experts if lazy is None else lazy
    costs = [float(c) for c in s.costs] or default_costs(lineup, targets, routes, lazy,
                                                         lineup.catch_up_width)

    name, enc_cfg, enc_params = encoder
    ids = [encode_prompt(lineup.tokenizer, t["prompt"], True) for t in tasks]
    feats = encode_features(Model(enc_cfg), enc_params, ids, lineup.pad_id, s.batch_size,
                            progress)
    train, test = split(len(tasks), s.test_fraction, s.seed)

    table = P.probe_layers(feats[:, train], correct[train], targets,
                           [f"layer {i + 1}" for i in range(feats.shape[0])], reg=s.probe_reg)
    layer = table.chosen if s.layer < 0 else int(s.layer)
    if not 0 <= layer < feats.shape[0]:
        raise ValueError(f"seqroute.layer={s.layer}: the encoder has {feats.shape[0]} layers "
                         "(0-based; -1 lets the probes choose)")
    probe_paths = P.write_probe_report(table, workdir)

    tc = T.TrunkConfig(hidden=tuple(s.trunk.hidden), steps=s.trunk.steps, lr=s.trunk.lr,
                       weight_decay=s.trunk.weight_decay, batch_size=s.trunk.batch_size,
                       seed=s.trunk.seed)
    trunk, history = T.train_trunk(feats[layer][train], correct[train], targets, layer, costs,
                                   tc, progress=progress)
    trunk_dir = os.path.join(workdir, "trunk")
    T.save_trunk(trunk_dir, trunk)
    with open(os.path.join(trunk_dir, META_FILE), "w") as f:
        json.dump({"encoder": name, "targets": targets, "layer": layer, "costs": costs,
                   "lam": float(s.lam)}, f, indent=1)

    p_test = trunk.predict(feats[layer][test])
    sweep = T.sweep(p_test, correct[test], costs, targets, list(s.lams))
    T.plot_sweep(sweep, os.path.join(workdir, "sweep.png"))
    at_lam = T.metrics(correct[test], T.route(p_test, costs, s.lam), costs, targets)
    report = {"targets": targets, "costs": costs, "layer": layer, "encoder": name,
              "cost_schedule": "given" if s.costs else ("lazy" if lazy else "eager"),
              "n_train": int(len(train)), "n_test": int(len(test)), "lam": float(s.lam),
              "metrics": at_lam, "sweep": sweep, "probes": table.to_dict(),
              "train_history": history,
              "label_accuracy": {t: float(correct[:, j].mean()) for j, t in enumerate(targets)}}
    with open(os.path.join(workdir, "report.json"), "w") as f:
        json.dump(_jsonable(report), f, indent=1)
    with open(os.path.join(workdir, "report.md"), "w") as f:
        f.write(report_markdown(report))
    report["trunk"] = trunk
    report["probes_markdown"] = table.markdown()
    report["paths"] = {**probe_paths, "trunk": trunk_dir,
                       "report": os.path.join(workdir, "report.md")}
    return report


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, np.integer, np.bool_)):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    return x


def report_markdown(report: dict) -> str:
    """The headline metrics at the configured lam and the lam sweep, as Markdown."""
    m = report["metrics"]
    lines = [f"SharedTrunkNet on encoder layer {report['layer'] + 1} ({report['encoder']}), "
             f"{report['n_train']} training / {report['n_test']} held-out prompts.", "",
             "| target | relative cost | accuracy (held out) |", "|---|---|---|"]
    top = max(report["costs"])
    for t, c in zip(report["targets"], report["costs"]):
        lines.append(f"| {t} | {c / top:.3f} | {100 * m['target_accuracy'][t]:.1f} |")
    lines += ["", f"At lam = {report['lam']}: routed accuracy {100 * m['accuracy']:.1f}%, best "
              f"single target {m['best_single']} {100 * m['best_single_accuracy']:.1f}%, oracle "
              f"{100 * m['oracle']:.1f}%; **gap captured {_pct(m['gap_captured'])}**, "
              f"**cost saving {_pct(m['cost_saving'])}**.", "",
              "| lam | accuracy | gap captured | mean relative cost | cost saving |",
              "|---|---|---|---|---|"]
    for row in report["sweep"]:
        lines.append(f"| {row['lam']} | {100 * row['accuracy']:.1f} | "
                     f"{_pct(row['gap_captured'])} | {row['mean_cost'] / top:.3f} | "
                     f"{_pct(row['cost_saving'])} |")
    return "\n".join(lines) + "\n"


def _pct(x) -> str:
    return "n/a" if x is None or not np.isfinite(x) else f"{100 * x:.1f}%"
