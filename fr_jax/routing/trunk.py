"""SharedTrunkNet: P(target correct) for every target from one prompt's pooled activations,
its training, the cost-aware routing rule and the headline metrics.

    trunk, history = train_trunk(features [N, D], correct [N, T], targets, layer, costs, cfg)
    p = trunk.predict(features)                       # [N, T] P(correct)
    choice = route(p, costs, lam)                     # [N]: argmax_t p_t - lam * c_t / max c
    metrics(correct, choice, costs, targets)          # gap captured, cost saving, ...

Costs enter relative to the most expensive target, so lam is unitless: lam = 0.1 trades
ten points of P(correct) for the whole cost of the most expensive target.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Dict, List, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from fr_jax.runtime.errors import CheckpointError

TRUNK_FILE = "trunk.json"


class SharedTrunkNet(nn.Module):
    """x [B, D] (standardised) -> logits [B, T]: a shared MLP trunk, then one linear head
    per target (a Dense with T outputs: column t is target t's head)."""

    hidden: Sequence[int]
    n_targets: int

    @nn.compact
    def __call__(self, x):
        for i, width in enumerate(self.hidden):
            x = nn.Dense(width, name=f"trunk_{i}")(x)
            if i == 0:
                x = nn.LayerNorm(name="trunk_norm")(x)
            x = nn.gelu(x)
        return nn.Dense(self.n_targets, name="heads")(x)


@dataclasses.dataclass
class TrunkConfig:
    hidden: Tuple[int, ...] = (256, 256)
    steps: int = 2000
    lr: float = 1e-3
    weight_decay: float = 1e-4
    batch_size: int = 256
    seed: int = 0
    eval_fraction: float = 0.2  # of the training prompts, for the validation loss


@dataclasses.dataclass
class Trunk:
    """A trained SharedTrunkNet with what it needs to be applied."""

    params: dict
    mean: np.ndarray  # [D] feature standardisation (training statistics)
    std: np.ndarray  # [D]
    target_names: List[str]
    layer: int  # the encoder layer (0-based) whose pooled activations it reads
    costs: List[float]  # per target
    hidden: Tuple[int, ...]
    pooling: str = "mean+last"

    def module(self) -> SharedTrunkNet:
        return SharedTrunkNet(tuple(self.hidden), len(self.target_names))

    def predict(self, features) -> np.ndarray:
        """features [N, D] -> P(correct) [N, T]."""
        x = (np.asarray(features, np.float32) - self.mean) / self.std
        logits = jax.jit(self.module().apply)({"params": self.params}, jnp.asarray(x))
        return np.asarray(jax.nn.sigmoid(logits))


def train_trunk(features, correct, target_names: Sequence[str], layer: int,
                costs: Sequence[float], cfg: TrunkConfig = TrunkConfig(),
                progress: bool = False) -> Tuple[Trunk, Dict[str, list]]:
    """Binary cross-entropy per (prompt, target) with AdamW; seeded, so a rerun gives the
    same net. Returns the trunk and its history (train loss per 50 steps, validation loss
    on `eval_fraction` of the prompts held out from the fit)."""
    from tqdm.auto import tqdm

    x = np.asarray(features, np.float32)
    y = np.asarray(correct, np.float32)
    if x.ndim != 2 or y.shape != (x.shape[0], len(target_names)):
        raise ValueError(f"features {x.shape} and correct {y.shape} do not match "
                         f"({len(target_names)} targets)")
    rng = np.random.default_rng(cfg.seed)
    order = rng.permutation(len(x))
    n_val = int(len(x) * cfg.eval_fraction) if len(x) >= 10 else 0
    val, fit = order[:n_val], order[n_val:]
    mean = x[fit].mean(0)
    std = np.maximum(x[fit].std(0), 1e-3 * (x[fit].std(0).mean() + 1e-6))
    xs = (x - mean) / std

    net = SharedTrunkNet(tuple(cfg.hidden), len(target_names))
    params = net.init(jax.random.key(cfg.seed), jnp.zeros((1, x.shape[1])))["params"]
    opt = optax.adamw(optax.cosine_decay_schedule(cfg.lr, cfg.steps, 0.1),
                      weight_decay=cfg.weight_decay)
    state = opt.init(params)

    def loss_fn(p, xb, yb):
        return jnp.mean(optax.sigmoid_binary_cross_entropy(net.apply({"params": p}, xb), yb))

    @jax.jit
    def step(p, s, xb, yb):
        loss, g = jax.value_and_grad(loss_fn)(p, xb, yb)
        upd, s = opt.update(g, s, p)
        return optax.apply_updates(p, upd), s, loss

    batch = min(cfg.batch_size, len(fit))
    history = {"step": [], "train_loss": [], "val_loss": []}
    perm, pos = rng.permutation(fit), 0
    for i in tqdm(range(cfg.steps), desc="trunk", disable=not progress):
        if pos + batch > len(perm):
            perm, pos = rng.permutation(fit), 0
        idx = perm[pos:pos + batch]
        pos += batch
        params, state, loss = step(params, state, jnp.asarray(xs[idx]), jnp.asarray(y[idx]))
        if (i + 1) % 50 == 0 or i + 1 == cfg.steps:
            history["step"].append(i + 1)
            history["train_loss"].append(float(loss))
            history["val_loss"].append(float(loss_fn(params, xs[val], y[val])) if n_val
                                       else float("nan"))
    trunk = Trunk(jax.device_get(params), mean, std, list(target_names), int(layer),
                  [float(c) for c in costs], tuple(int(h) for h in cfg.hidden))
    return trunk, history


# ---------------------------------------------------------------------------- routing
def relative_costs(costs) -> np.ndarray:
    c = np.asarray(costs, np.float64)
    if c.ndim != 1 or (c <= 0).any():
        raise ValueError(f"costs must be positive, one per target; got {list(costs)}")
    return c / c.max()


def route(p, costs, lam: float) -> np.ndarray:
    """p [N, T] P(correct) -> per prompt argmax_t p_t - lam * c_t / max(c); ties go to the
    cheaper target."""
    c = relative_costs(costs)
    score = np.asarray(p, np.float64) - lam * c
    order = np.argsort(c, kind="stable")  # cheapest first, so argmax's first hit is cheapest
    return order[np.argmax(score[:, order], axis=1)]


def metrics(correct, chosen, costs, target_names: Sequence[str]) -> dict:
    """Accuracy of the routed choice against each target, the best single one and the oracle
    (a prompt counts if any target gets it right), and cost.

    gap_captured = (routed - best single) / (oracle - best single): 1 = the oracle, 0 = no
    better than always using the best single target; nan when the oracle is no better than
    the best single target (there is no gap). cost_saving = 1 - mean cost / max cost: the
    share of the most expensive target's cost saved."""
    correct = np.asarray(correct, bool)
    chosen = np.asarray(chosen, int)
    c = np.asarray(costs, np.float64)
    per_target = correct.mean(0)
    best = int(np.argmax(per_target))
    acc = float(correct[np.arange(len(chosen)), chosen].mean())
    oracle = float(correct.any(1).mean())
    gap = oracle - per_target[best]
    mean_cost = float(c[chosen].mean())
    return {"accuracy": acc,
            "target_accuracy": {t: float(a) for t, a in zip(target_names, per_target)},
            "best_single": target_names[best], "best_single_accuracy": float(per_target[best]),
            "oracle": oracle,
            "gap_captured": float((acc - per_target[best]) / gap) if gap > 0 else float("nan"),
            "mean_cost": mean_cost, "cost_saving": float(1.0 - mean_cost / c.max()),
            "routed_share": {t: float((chosen == i).mean()) for i, t in enumerate(target_names)}}


def sweep(p, correct, costs, target_names, lams) -> List[dict]:
    """metrics(...) at every lam, with "lam" added: the accuracy-cost curve."""
    return [dict(metrics(correct, route(p, costs, lam), costs, target_names), lam=float(lam))
            for lam in lams]


def plot_sweep(rows: List[dict], path: str):
    """Accuracy against mean relative cost, one point per lam; single targets and the
    oracle as references."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    top = max(rows[0]["mean_cost"] / max(1e-12, 1 - rows[0]["cost_saving"]), 1e-12)
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    xs = [r["mean_cost"] / top for r in rows]
    ax.plot(xs, [r["accuracy"] for r in rows], "o-", label="SharedTrunkNet (lam sweep)")
    for x, r in zip(xs, rows):
        ax.annotate(f"{r['lam']:g}", (x, r["accuracy"]), fontsize=7, xytext=(3, 3),
                    textcoords="offset points")
    ax.axhline(rows[0]["oracle"], color="grey", ls="--", lw=1, label="oracle")
    ax.axhline(rows[0]["best_single_accuracy"], color="tab:red", ls=":", lw=1,
               label=f"best single ({rows[0]['best_single']})")
    ax.set_xlabel("mean cost relative to the most expensive target")
    ax.set_ylabel("accuracy (held out)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------- disk
def save_trunk(path: str, trunk: Trunk) -> str:
    """Orbax checkpoint of params + standardisation under path/state, metadata in
    path/trunk.json."""
    import orbax.checkpoint as ocp

    path = os.path.abspath(path)
    state_dir = os.path.join(path, "state")
    if os.path.isdir(state_dir):
        import shutil
        shutil.rmtree(state_dir)
    os.makedirs(path, exist_ok=True)
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(state_dir, {"params": trunk.params, "mean": np.asarray(trunk.mean),
                          "std": np.asarray(trunk.std)})
    ckpt.wait_until_finished()
    with open(os.path.join(path, TRUNK_FILE), "w") as f:
        json.dump({"target_names": trunk.target_names, "layer": trunk.layer,
                   "costs": trunk.costs, "hidden": list(trunk.hidden),
                   "pooling": trunk.pooling, "features": int(np.asarray(trunk.mean).shape[0])},
                  f, indent=1)
    return path


def load_trunk(path: str) -> Trunk:
    import orbax.checkpoint as ocp

    path = os.path.abspath(path)
    meta_file = os.path.join(path, TRUNK_FILE)
    if not os.path.isfile(meta_file) or not os.path.isdir(os.path.join(path, "state")):
        raise CheckpointError(
            f"{path!r} is not a SharedTrunkNet folder (expected {TRUNK_FILE} and an Orbax "
            "state/ folder); train one with `python -m fr_jax.seqroute`")
    with open(meta_file) as f:
        meta = json.load(f)
    net = SharedTrunkNet(tuple(meta["hidden"]), len(meta["target_names"]))
    d = meta["features"]
    abstract = {"params": jax.eval_shape(lambda: net.init(jax.random.key(0),
                                                          jnp.zeros((1, d))))["params"],
                "mean": jax.ShapeDtypeStruct((d,), np.float32),
                "std": jax.ShapeDtypeStruct((d,), np.float32)}
    state = ocp.StandardCheckpointer().restore(os.path.join(path, "state"), abstract)
    return Trunk(jax.device_get(state["params"]), np.asarray(state["mean"]),
                 np.asarray(state["std"]), list(meta["target_names"]), int(meta["layer"]),
                 [float(c) for c in meta["costs"]], tuple(meta["hidden"]), meta["pooling"])
