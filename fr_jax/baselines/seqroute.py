"""Sequence-level routing on prefill activations: SharedTrunkNet (arXiv 2603.20895).

Encoder-Target Decoupling: an *encoder* (any fr_jax model; by default the router's backbone)
reads the prompt once; its residual stream after each layer is pooled over the prompt (the
mean over the prompt's tokens and the last token, concatenated: [2E] per layer). The *targets*
are the candidate generators: each expert alone (`expert:<i>`) and FusionRoute itself
(`fusionroute`, the expensive target). Pipeline (`python -m fr_jax.seqroute`, `run` below):

  1. labels: every target answers a labelled prompt set; each answer is scored (correct or
     not) and cached per target on disk, so a rerun decodes nothing twice;
  2. probes (probes.py): Fisher separability J and effective dimensionality d_eff per layer,
     on the training split; the layer rule picks the encoder layer;
  3. SharedTrunkNet (trunk.py): a shared MLP trunk with one P(target correct) head per
     target, trained with binary cross-entropy on that layer's pooled activations;
  4. routing: per prompt argmax_t P(correct_t) - lam * cost_t (costs relative to the most
     expensive target), swept over lam on the held-out split: the accuracy-cost curve and
     the headline metrics (gap to the oracle captured, cost saved).

At decode time (`Selector`, decode mode `sequence`) the same pooling runs on-device inside the
jitted prefill, on the encoder truncated after the chosen layer, and the chosen target then
decodes the whole answer.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from fr_jax.fusion import Mode, ModeError
from fr_jax.models import Model, ModelConfig

FUSIONROUTE = "fusionroute"


# ---------------------------------------------------------------------------- targets
def default_targets(n_experts: int, with_fusionroute: bool = True) -> List[str]:
    return [f"expert:{i}" for i in range(n_experts)] + ([FUSIONROUTE] if with_fusionroute else [])


def parse_targets(targets: Sequence[str], n_experts: int) -> List[Mode]:
    """Target names -> decode modes; a target is `expert:<i>` or `fusionroute`."""
    if not targets:
        raise ModeError("sequence-level routing needs at least one target")
    modes = []
    for t in targets:
        m = Mode.parse(t, n_experts)
        if m.kind not in ("expert", "fusionroute"):
            raise ModeError(f"target {t!r} cannot be chosen per prompt: targets are "
                            f"expert:<i> (0..{n_experts - 1}) or {FUSIONROUTE}")
        modes.append(m)
    if len(set(targets)) != len(targets):
        raise ModeError(f"targets repeat a name: {list(targets)}")
    return modes


# ---------------------------------------------------------------------------- features
def truncate(cfg: ModelConfig, params, n_layers: int) -> Tuple[ModelConfig, dict]:
    """The encoder's first `n_layers` layers (the layers are stacked on axis 0)."""
    if not 1 <= n_layers <= cfg.num_layers:
        raise ValueError(f"cannot keep {n_layers} of {cfg.num_layers} layers")
    small = cfg.replace(num_layers=n_layers, layer_types=tuple(cfg.layer_types[:n_layers]))
    params = dict(params, layers=jax.tree.map(lambda x: x[:n_layers], params["layers"]))
    return small, params


def pool(residual, mask):
    """residual [L, B, T, E], mask [B, T] (left-padded prompts) -> [L, B, 2E] float32: the
    mean over each prompt's real tokens, then its last token (position T-1)."""
    r = residual.astype(jnp.float32)
    m = mask.astype(jnp.float32)[None, :, :, None]
    mean = jnp.sum(r * m, axis=2) / jnp.maximum(jnp.sum(m, axis=2), 1.0)
    return jnp.concatenate([mean, r[:, :, -1]], axis=-1)


def prefill_features(model: Model, params, tokens, mask):
    """Pooled per-layer activations of left-padded prompts tokens [B, T] -> [L, B, 2E]."""
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0).astype(jnp.int32)
    _, residual = model.forward(params, tokens, positions, mask.astype(jnp.int32),
                                collect_intermediates=True, last_only=True)
    return pool(residual, mask)


def encode_features(model: Model, params, prompts: Sequence[Sequence[int]], pad_id: int,
                    batch_size: int = 64, progress: bool = False) -> np.ndarray:
    """Token-id prompts -> pooled activations of every layer [L, N, 2E] (numpy float32).
    Batches are padded to `batch_size` rows and to a multiple of 16 tokens so the forward
    compiles a handful of times, not once per batch."""
    from tqdm.auto import tqdm

    from fr_jax.decode import left_pad

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


# ---------------------------------------------------------------------------- decode-time
class Selector:
    """The per-prompt choice inside the decoder's prefill: the encoder truncated after the
    trunk's layer -> pooled features -> SharedTrunkNet -> argmax_t P(correct_t) - lam c_t.

    Pure: `choose(params, tokens, mask)` traces into the jitted prefill, with
    params = `selector.params(encoder_params)`.
    """

    def __init__(self, encoder_cfg: ModelConfig, trunk, lam: float = 0.0):
        from fr_jax.baselines.trunk import SharedTrunkNet

        if trunk.layer >= encoder_cfg.num_layers:
            raise ValueError(f"the SharedTrunkNet reads encoder layer {trunk.layer} but the "
                             f"encoder has {encoder_cfg.num_layers} layers: wrong encoder")
        width = int(np.asarray(trunk.mean).shape[-1])
        if width != 2 * encoder_cfg.hidden_size:
            raise ValueError(f"the SharedTrunkNet takes {width} features but the encoder "
                             f"gives {2 * encoder_cfg.hidden_size} (2 x hidden size): it was "
                             "trained on another encoder")
        self.trunk = trunk
        self.targets = list(trunk.target_names)
        self.lam = float(lam)
        self.encoder_cfg = encoder_cfg
        self.encoder = Model(encoder_cfg.replace(
            num_layers=trunk.layer + 1, layer_types=tuple(encoder_cfg.layer_types[:trunk.layer + 1])))
        self.net = SharedTrunkNet(hidden=tuple(trunk.hidden), n_targets=len(self.targets))
        costs = np.asarray(trunk.costs, np.float64)
        self.rel_costs = jnp.asarray(costs / costs.max(), jnp.float32)

    def params(self, encoder_params) -> dict:
        _, enc = truncate(self.encoder_cfg, encoder_params, self.trunk.layer + 1)
        return {"encoder": enc, "net": self.trunk.params,
                "mean": jnp.asarray(self.trunk.mean, jnp.float32),
                "std": jnp.asarray(self.trunk.std, jnp.float32)}

    def choose(self, params, tokens, mask):
        """tokens, mask [B, T] -> (target index [B] int32, P(correct) [B, n_targets])."""
        feats = prefill_features(self.encoder, params["encoder"], tokens, mask)[-1]
        x = (feats - params["mean"]) / params["std"]
        p = jax.nn.sigmoid(self.net.apply({"params": params["net"]}, x).astype(jnp.float32))
        score = p - self.lam * self.rel_costs
        # Ties go to the cheaper target, as in trunk.route.
        order = jnp.argsort(self.rel_costs, stable=True)
        pick = jnp.argmax(score[:, order], axis=-1)
        return order[pick].astype(jnp.int32), p


# ---------------------------------------------------------------------------- labels
def _key(prompt: str) -> str:
    return hashlib.sha256(prompt.encode()).hexdigest()[:20]


def label_targets(lineup, targets: Sequence[str], tasks: Sequence[dict], scorer,
                  cache_dir: str, fingerprint: dict, max_new_tokens: int,
                  batch_size: int = 64, progress: bool = False) -> np.ndarray:
    """Runs each target over the labelled prompts and scores its answers -> correct [N, T].

    tasks: [{"prompt", "answer"}]; scorer(answer, output) -> bool. Answers are cached per
    target in `cache_dir/<target>.jsonl`; `fingerprint` (the models and decode settings)
    is stored beside them, and a cache made with other models is an error, not reused.
    """
    from tqdm.auto import tqdm

    from fr_jax.eval.modes import generate

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
    keys = [_key(t["prompt"]) for t in tasks]
    bar = tqdm(total=len(tasks) * len(targets), desc="label", disable=not progress)
    for j, target in enumerate(targets):
        path = os.path.join(cache_dir, target.replace(":", "_") + ".jsonl")
        cached = {}
        if os.path.isfile(path):
            with open(path) as f:
                for line in f:
                    rec = json.loads(line)
                    cached[rec["key"]] = rec["output"]
        todo = [i for i, k in enumerate(keys) if k not in cached]
        bar.update(len(tasks) - len(todo))
        if todo:
            gen = generate(lineup, target, [tasks[i]["prompt"] for i in todo], max_new_tokens,
                           batch_size, progress=bar)
            with open(path, "a") as f:
                for i, text in zip(todo, gen.texts):
                    cached[keys[i]] = text
                    f.write(json.dumps({"key": keys[i], "output": text}) + "\n")
        correct[:, j] = [bool(scorer(t["answer"], cached[k])) for t, k in zip(tasks, keys)]
    bar.close()
    return correct


def param_count(tree) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def default_costs(lineup, targets: Sequence[str]) -> List[float]:
    """Weights read per generated token, in parameters: an expert alone reads its own; the
    FusionRoute decoder (eager schedule) reads the router's and every expert's."""
    experts = lineup.params["experts"]
    if lineup.experts.stacked:
        per = [param_count(experts) // lineup.experts.n] * lineup.experts.n
    else:
        per = [param_count(p) for p in experts]
    router = param_count(lineup.params["router"]) if lineup.router is not None else 0
    costs = []
    for t in targets:
        m = Mode.parse(t, lineup.experts.n)
        costs.append(float(per[m.expert] if m.kind == "expert" else router + sum(per)))
    return costs


# ---------------------------------------------------------------------------- pipeline
META_FILE = "seqroute.json"  # beside the trunk's Orbax folder: encoder, targets, layer


def read_labelled(path: str) -> List[dict]:
    """Labelled prompts: JSONL with a string "prompt" and a reference "answer" (or
    "response", the SFT field) per line; an optional "domain" groups the report."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"labelled prompts {path!r} not found (expected JSONL, one "
                                '{"prompt": ..., "answer": ...} object per line)')
    out = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            rec = json.loads(line)
            answer = rec.get("answer", rec.get("response"))
            if not isinstance(rec.get("prompt"), str) or not isinstance(answer, str):
                raise ValueError(f'{path}:{n}: expected string "prompt" and "answer" fields')
            out.append({"prompt": rec["prompt"], "answer": answer,
                        "domain": rec.get("domain", "all")})
    if not out:
        raise ValueError(f"labelled prompts {path!r} is empty")
    return out


def split(n: int, test_fraction: float, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """Seeded train / test indices (the trunk and the layer rule never see the test part)."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    order = np.random.default_rng(seed).permutation(n)
    k = max(1, int(round(n * test_fraction)))
    return np.sort(order[k:]), np.sort(order[:k])


def build(lineup, tasks: Sequence[dict], s, workdir: str, encoder: Tuple[str, ModelConfig, dict],
          scorer, progress: bool = False) -> dict:
    """The whole SharedTrunkNet pipeline over a Lineup (labels -> probes -> trunk -> sweep).

    s: the `seqroute` config section (targets, costs, layer, probe_reg, trunk, lams, lam,
    test_fraction, max_new_tokens, batch_size, seed). encoder: (name, cfg, params) -- name
    "router" for the router's backbone, else the encoder's folder. Writes under `workdir`:
    labels/, probes.{json,md,png}, trunk/ (+ seqroute.json), report.{json,md}, sweep.png.
    Returns the report dict (also `report["trunk"]`, the trained Trunk).
    """
    from fr_jax.baselines import probes as P
    from fr_jax.baselines import trunk as T
    from fr_jax.data import encode_prompt

    n_exp = lineup.experts.n
    targets = list(s.targets) or default_targets(n_exp)
    parse_targets(targets, n_exp)
    costs = [float(c) for c in s.costs] or default_costs(lineup, targets)
    if len(costs) != len(targets) or min(costs) <= 0:
        raise ValueError(f"seqroute.costs: expected {len(targets)} positive numbers (one per "
                         f"target {targets}), got {list(s.costs)}")
    os.makedirs(workdir, exist_ok=True)
    fingerprint = {"router": lineup.source.get("router"), "experts": lineup.source.get("experts"),
                   "max_new_tokens": int(s.max_new_tokens)}
    correct = label_targets(lineup, targets, tasks, scorer, os.path.join(workdir, "labels"),
                            fingerprint, s.max_new_tokens, s.batch_size, progress)

    name, enc_cfg, enc_params = encoder
    tok = lineup.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    ids = [encode_prompt(tok, t["prompt"], True) for t in tasks]
    feats = encode_features(Model(enc_cfg), enc_params, ids, pad, s.batch_size, progress)
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


def load_selector(path: str, encoder_cfg: ModelConfig, encoder_params, lam: Optional[float],
                  mesh=None):
    """(Selector, selector params) from a trained SharedTrunkNet folder, for decode mode
    `sequence`; the caller passes the encoder the folder's seqroute.json names. lam None =
    the lam the folder's report used."""
    from fr_jax.baselines.trunk import load_trunk

    trunk = load_trunk(path)
    meta = read_meta(path)
    sel = Selector(encoder_cfg, trunk, meta["lam"] if lam is None else lam)
    params = sel.params(encoder_params)
    if mesh is not None:
        from fr_jax import sharding as sh
        rest = {k: v for k, v in params.items() if k != "encoder"}
        params = dict(jax.device_put(rest, sh.replicated(mesh)), encoder=params["encoder"])
    return sel, params


def read_meta(path: str) -> dict:
    meta_path = os.path.join(path, META_FILE)
    if not os.path.isfile(meta_path):
        raise FileNotFoundError(f"{path!r} is not a trained SharedTrunkNet folder (no "
                                f"{META_FILE}); train one with `python -m fr_jax.seqroute`")
    with open(meta_path) as f:
        return json.load(f)
