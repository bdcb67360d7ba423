"""Layer probes for sequence-level routing: which encoder layer's pooled prefill activations
tell whether a target will answer a prompt correctly.

Per layer and target, on the training prompts:
  - Fisher separability J of correct vs incorrect prompts: tr((S_w + eps I)^-1 S_b), with
    class-prior-weighted scatters. For two classes S_b is rank one, so
    J = pi_0 pi_1 dmu^T (S_w + eps I)^-1 dmu: one linear solve. eps = reg * tr(S_w) / D
    shrinks S_w toward a scaled identity, so J stays finite when D exceeds the prompt count.
  - Effective dimensionality d_eff of the activations: the participation ratio
    (sum lambda)^2 / sum lambda^2 of the covariance's eigenvalues = tr(C)^2 / ||C||_F^2.

The layer rule (`choose_layer`): the highest J averaged over targets wins; among layers
within 5% of that best J the earliest is taken, because the decoder then runs the encoder
only up to that layer. d_eff is reported as a diagnostic: a chosen layer with d_eff < 2
has collapsed onto a line and is flagged in the table.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Dict, List, Optional, Sequence

import numpy as np

NEAR_BEST = 0.05  # layers within this fraction of the best mean J count as tied


def fisher_separability(x, y, reg: float = 1e-2) -> float:
    """x [N, D], y [N] bool -> J (float); nan when one class is empty (J is undefined: the
    caller averages with nanmean)."""
    x = np.asarray(x, np.float64)
    y = np.asarray(y, bool)
    n1 = int(y.sum())
    n0 = len(y) - n1
    if n0 == 0 or n1 == 0:
        return float("nan")
    p0, p1 = n0 / len(y), n1 / len(y)
    x0, x1 = x[~y], x[y]
    m0, m1 = x0.mean(0), x1.mean(0)
    c0, c1 = x0 - m0, x1 - m1
    s_w = p0 * (c0.T @ c0) / n0 + p1 * (c1.T @ c1) / n1
    d = x.shape[1]
    eps = reg * np.trace(s_w) / d
    if eps <= 0:  # every class is a single point: fall back to an absolute floor
        eps = reg
    dmu = m1 - m0
    sol = np.linalg.solve(s_w + eps * np.eye(d), dmu)
    return float(p0 * p1 * dmu @ sol)


def effective_dim(x) -> float:
    """x [N, D] -> participation ratio of the covariance's eigenvalues (1 .. min(N, D))."""
    x = np.asarray(x, np.float64)
    c = x - x.mean(0)
    # The D x D covariance and the N x N Gram matrix share their nonzero eigenvalues.
    m = (c.T @ c) if c.shape[1] <= c.shape[0] else (c @ c.T)
    tr = np.trace(m)
    fro2 = np.sum(m * m)
    return float(tr * tr / fro2) if fro2 > 0 else 0.0


def choose_layer(j_mean, d_eff=None) -> int:
    """The earliest layer whose mean J is within NEAR_BEST of the best (see module doc).
    When no layer has a defined J (every target always right, or always wrong, on the
    training prompts: nothing to separate) the last layer is taken, with a warning."""
    j = np.nan_to_num(np.asarray(j_mean, np.float64), nan=-np.inf)
    best = j.max()
    if not np.isfinite(best):
        import logging
        logging.getLogger("fr_jax.probes").warning(
            "no layer has a defined Fisher J: every target was always right or always wrong "
            "on the training prompts; using the last layer (label more, or harder, prompts)")
        return len(j) - 1
    return int(np.flatnonzero(j >= best - NEAR_BEST * abs(best))[0])


@dataclasses.dataclass
class ProbeTable:
    J: np.ndarray  # [L, T]
    J_mean: np.ndarray  # [L]
    d_eff: np.ndarray  # [L]
    target_names: List[str]
    layer_names: List[str]
    chosen: int

    def to_dict(self) -> dict:
        return {"J": np.asarray(self.J).tolist(), "J_mean": np.asarray(self.J_mean).tolist(),
                "d_eff": np.asarray(self.d_eff).tolist(), "target_names": list(self.target_names),
                "layer_names": list(self.layer_names), "chosen": int(self.chosen)}

    @classmethod
    def from_dict(cls, d: dict) -> "ProbeTable":
        return cls(np.asarray(d["J"], float), np.asarray(d["J_mean"], float),
                   np.asarray(d["d_eff"], float), list(d["target_names"]),
                   list(d["layer_names"]), int(d["chosen"]))

    def markdown(self) -> str:
        fmt = lambda v: "n/a" if not np.isfinite(v) else f"{v:.3f}"
        lines = ["Layer probes (training prompts): Fisher separability J of correct vs "
                 "incorrect per target, its mean, and the effective dimensionality d_eff.", "",
                 "| layer | " + " | ".join(f"J {t}" for t in self.target_names)
                 + " | J mean | d_eff |", "|" + "---|" * (len(self.target_names) + 3)]
        for i, name in enumerate(self.layer_names):
            mark = " **(chosen)**" if i == self.chosen else ""
            if i == self.chosen and self.d_eff[i] < 2:
                mark += " (collapsed: d_eff < 2)"
            lines.append(f"| {name}{mark} | " + " | ".join(fmt(v) for v in self.J[i])
                         + f" | {fmt(self.J_mean[i])} | {self.d_eff[i]:.1f} |")
        return "\n".join(lines) + "\n"


def probe_layers(features, correct, target_names: Sequence[str],
                 layer_names: Optional[Sequence[str]] = None, reg: float = 1e-2) -> ProbeTable:
    """features [L, N, D] (pooled activations per layer), correct [N, T] -> ProbeTable."""
    features = np.asarray(features)
    correct = np.asarray(correct, bool)
    n_layers = features.shape[0]
    if correct.shape != (features.shape[1], len(target_names)):
        raise ValueError(f"correct has shape {correct.shape}; expected ({features.shape[1]}, "
                         f"{len(target_names)}) (prompts x targets)")
    j = np.array([[fisher_separability(features[l], correct[:, t], reg)
                   for t in range(correct.shape[1])] for l in range(n_layers)])
    with np.errstate(all="ignore"):
        j_mean = np.array([np.nanmean(r) if np.isfinite(r).any() else np.nan for r in j])
    d_eff = np.array([effective_dim(features[l]) for l in range(n_layers)])
    names = list(layer_names) if layer_names else [f"layer {i + 1}" for i in range(n_layers)]
    return ProbeTable(j, j_mean, d_eff, list(target_names), names, choose_layer(j_mean, d_eff))


def write_probe_report(table: ProbeTable, outdir: str) -> Dict[str, str]:
    """probes.json, probes.md and probes.png (J mean and d_eff per layer) under outdir."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(outdir, exist_ok=True)
    paths = {k: os.path.join(outdir, f"probes.{k}") for k in ("json", "md", "png")}
    with open(paths["json"], "w") as f:
        json.dump(table.to_dict(), f, indent=1)
    with open(paths["md"], "w") as f:
        f.write(table.markdown())
    x = np.arange(1, len(table.layer_names) + 1)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(x, table.J_mean, "o-", color="tab:blue", label="Fisher J (mean over targets)")
    ax.set_xlabel("encoder layer")
    ax.set_ylabel("J", color="tab:blue")
    ax.axvline(table.chosen + 1, color="grey", ls="--", lw=1)
    ax2 = ax.twinx()
    ax2.plot(x, table.d_eff, "s-", color="tab:orange", label="d_eff")
    ax2.set_ylabel("effective dimensionality", color="tab:orange")
    ax.set_title(f"layer probes (chosen: {table.layer_names[table.chosen]})")
    fig.tight_layout()
    fig.savefig(paths["png"], dpi=110)
    plt.close(fig)
    return paths
