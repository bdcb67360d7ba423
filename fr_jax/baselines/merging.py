"""Model merging: one model from experts fine-tuned from a shared base, as pure functions
over param pytrees (any nesting of dicts of arrays, as `load_hf` returns).

With task vectors tau_i = expert_i - base:
  - `linear`: sum_i a_i expert_i with weights a normalised to sum 1 (default: the mean);
  - `task_arithmetic`: base + sum_i lambda_i tau_i (Ilharco et al. 2023);
  - `ties`: trim each tau_i to its top-`density` entries by magnitude, elect each entry's sign
    as the sign of the sum of the trimmed tau_i, average the trimmed entries that agree with
    it (a disjoint mean), then base + lam * that (Yadav et al. 2023);
  - `dare`: drop each entry of each tau_i with probability `drop` and rescale the survivors
    by 1 / (1 - drop), seeded, then combine by task arithmetic or TIES (Yu et al. 2023).

Arithmetic is float32 and the result takes the base's dtype. Merging runs on one host: every
expert's weights are held in memory at once (use `dtype` in `merge_hf` to write bf16).
`python -m fr_jax.merge` writes the result as an HF folder; decode mode `merged` uses it.
"""

from __future__ import annotations

import json
import math
import os
from typing import Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from fr_jax.hf import load_hf, load_tokenizer, save_hf
from fr_jax.runtime.errors import CheckpointError, MergeError
from fr_jax.runtime.paths import check_output

METHODS = ("linear", "task_arithmetic", "ties", "dare")
Weights = Union[float, Sequence[float]]


def _path_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def check_compatible(base, experts: Sequence) -> None:
    """Every expert has the base's tensors with the base's shapes (else: which tensor)."""
    if not experts:
        raise MergeError("no experts to merge")
    ref = {_path_str(p): x for p, x in jax.tree_util.tree_leaves_with_path(base)}
    for i, e in enumerate(experts):
        got = {_path_str(p): x for p, x in jax.tree_util.tree_leaves_with_path(e)}
        for name in sorted(set(ref) ^ set(got)):
            where = "the base" if name not in ref else f"expert {i}"
            raise MergeError(f"tensor {name!r} is missing from {where}: experts must be "
                             "fine-tuned from the same base")
        for name, x in ref.items():
            if np.shape(got[name]) != np.shape(x):
                raise MergeError(f"tensor {name!r}: expert {i} has shape "
                                 f"{np.shape(got[name])}, the base {np.shape(x)}; experts "
                                 "must be fine-tuned from the same base")


def _lambdas(value: Weights, n: int, name: str):
    vals = [float(value)] * n if np.isscalar(value) else [float(v) for v in value]
    if len(vals) != n:
        raise MergeError(f"{name}: expected one value per expert ({n}), got {len(vals)}")
    return vals


def _f32(x):
    return jnp.asarray(x, jnp.float32)


def _cast_like(tree, like):
    return jax.tree.map(lambda x, b: x.astype(jnp.asarray(b).dtype), tree, like)


def task_vectors(base, experts: Sequence) -> list:
    """[expert_i - base] (float32 pytrees)."""
    return [jax.tree.map(lambda e, b: _f32(e) - _f32(b), e, base) for e in experts]


def linear(experts: Sequence, weights: Optional[Sequence[float]] = None):
    """sum_i a_i expert_i, a = weights / sum(weights) (default: the plain mean)."""
    if not experts:
        raise MergeError("no experts to merge")
    w = np.ones(len(experts)) if weights is None else np.asarray(_lambdas(
        list(weights), len(experts), "weights"))
    if (w < 0).any() or w.sum() <= 0:
        raise MergeError(f"linear weights must be non-negative with a positive sum, got "
                         f"{w.tolist()}")
    w = w / w.sum()
    out = jax.tree.map(lambda *xs: sum(float(a) * _f32(x) for a, x in zip(w, xs)), *experts)
    return _cast_like(out, experts[0])


def _add(base, taus, lambdas):
    merged = jax.tree.map(lambda b, *ts: _f32(b) + sum(l * t for l, t in zip(lambdas, ts)),
                          base, *taus)
    return _cast_like(merged, base)


def task_arithmetic(base, experts: Sequence, lambdas: Weights = 1.0):
    """base + sum_i lambda_i (expert_i - base)."""
    check_compatible(base, experts)
    return _add(base, task_vectors(base, experts), _lambdas(lambdas, len(experts), "lambdas"))


def trim(tau, density: float):
    """Keeps the k = ceil(density * size) largest-magnitude entries of one tensor, zeroes the
    rest. Ties at the threshold are broken by position (the earlier entry is kept), so
    exactly k entries survive."""
    flat = tau.reshape(-1)
    k = max(1, math.ceil(density * flat.size))
    if k >= flat.size:
        return tau
    # A stable argsort on -|tau| ranks equal magnitudes by position.
    keep = jnp.argsort(-jnp.abs(flat), stable=True)[:k]
    return jnp.zeros_like(flat).at[keep].set(flat[keep]).reshape(tau.shape)


def _ties_combine(taus, density: float):
    def one(*ts):
        trimmed = jnp.stack([trim(t, density) for t in ts])
        sign = jnp.sign(jnp.sum(trimmed, axis=0))
        agree = (jnp.sign(trimmed) == sign) & (trimmed != 0)
        count = jnp.sum(agree, axis=0)
        total = jnp.sum(jnp.where(agree, trimmed, 0.0), axis=0)
        return jnp.where(count > 0, total / jnp.maximum(count, 1), 0.0)
    return jax.tree.map(one, *taus)


def _check_fraction(name: str, value: float, allow_one: bool = True):
    ok = 0.0 < value <= 1.0 if allow_one else 0.0 <= value < 1.0
    if not ok:
        bound = "(0, 1]" if allow_one else "[0, 1)"
        raise MergeError(f"{name} must be in {bound}, got {value}")


def ties(base, experts: Sequence, density: float = 0.2, lam: float = 1.0):
    """TIES-Merging: trim to `density`, elect signs, disjoint mean; base + lam * result."""
    check_compatible(base, experts)
    _check_fraction("density", density)
    merged = _ties_combine(task_vectors(base, experts), density)
    return _add(base, [merged], [float(lam)])


def dare_mask(tau, drop: float, key):
    """DARE on one tensor: each entry kept with probability 1 - drop, survivors / (1 - drop)."""
    keep = jax.random.bernoulli(key, 1.0 - drop, tau.shape)
    return jnp.where(keep, tau / (1.0 - drop), 0.0)


def dare(base, experts: Sequence, drop: float = 0.9, seed: int = 0, lambdas: Weights = 1.0,
         combine: str = "task_arithmetic", density: float = 1.0, lam: float = 1.0):
    """DARE (drop and rescale each task vector, seeded), then task arithmetic (`lambdas`) or
    TIES (`density`, `lam`). The key of each tensor is derived from (seed, expert index,
    tensor path), so a merge is reproducible and does not depend on traversal order."""
    check_compatible(base, experts)
    _check_fraction("drop", drop, allow_one=False)
    if combine not in ("task_arithmetic", "ties"):
        raise MergeError(f"dare: combine must be 'task_arithmetic' or 'ties', got {combine!r}")
    root = jax.random.key(seed)
    taus = []
    for i, tau in enumerate(task_vectors(base, experts)):
        def one(path, t, i=i):
            tag = int.from_bytes(_path_str(path).encode()[-8:].rjust(8, b"\0"), "little")
            key = jax.random.fold_in(jax.random.fold_in(root, i), tag % (2**31 - 1))
            return dare_mask(t, drop, key)
        taus.append(jax.tree_util.tree_map_with_path(one, tau))
    if combine == "ties":
        _check_fraction("density", density)
        return _add(base, [_ties_combine(taus, density)], [float(lam)])
    return _add(base, taus, _lambdas(lambdas, len(experts), "lambdas"))


def merge(method: str, base, experts: Sequence, **options):
    """Dispatch by name: linear | task_arithmetic | ties | dare."""
    fns = {"linear": lambda: linear(experts, options.get("weights")),
           "task_arithmetic": lambda: task_arithmetic(base, experts,
                                                      options.get("lambdas", 1.0)),
           "ties": lambda: ties(base, experts, options.get("density", 0.2),
                                options.get("lam", 1.0)),
           "dare": lambda: dare(base, experts, **{k: v for k, v in options.items() if k in (
               "drop", "seed", "lambdas", "combine", "density", "lam")})}
    if method not in fns:
        raise MergeError(f"unknown merge method {method!r}; choose one of {', '.join(METHODS)}")
    if method == "linear" and len(experts) > 1:
        check_compatible(experts[0], experts[1:])
    return fns[method]()


_ARCH_FIELDS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_layers",
                "num_heads", "num_kv_heads", "head_dim", "tie_word_embeddings", "layer_types")


def merge_hf(base_path: str, expert_paths: Sequence[str], out: str, method: str,
             dtype: Optional[str] = None, **options) -> str:
    """Merges HF folders (experts of one base) into the HF folder `out` (+ merge.json)."""
    if not expert_paths:
        raise MergeError("no expert folders given")
    check_output(out, "merge output", [base_path, *expert_paths], makes_folders=True)
    base_cfg, base = load_hf(base_path)
    experts = []
    for p in expert_paths:
        cfg, params = load_hf(p)
        for field in _ARCH_FIELDS:
            if getattr(cfg, field) != getattr(base_cfg, field):
                raise MergeError(f"{p}: {field} = {getattr(cfg, field)!r} but the base "
                                 f"{base_path} has {getattr(base_cfg, field)!r}; experts must "
                                 "share the base's architecture")
        experts.append(params)
    merged = merge(method, base, experts, **options)
    tokenizer = None
    for p in [base_path] + list(expert_paths):
        try:
            tokenizer = load_tokenizer(p)
            break
        except CheckpointError:
            continue
    save_hf(out, base_cfg, jax.device_get(merged), tokenizer=tokenizer, dtype=dtype or None)
    with open(os.path.join(out, "merge.json"), "w") as f:
        json.dump({"method": method, "options": options,
                   "base": os.path.abspath(base_path),
                   "experts": [os.path.abspath(p) for p in expert_paths]}, f, indent=1,
                  default=str)
    return out
