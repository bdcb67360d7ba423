"""Meshes and the one table that maps logical axis names to mesh axes.

Params carry logical axis names (`Model.logical_axes()`); caches and batches get theirs
here. `RULES` maps each name to mesh axes; a change of parallelism is a change of mesh shape
in the config, never of model code. A dimension whose size the mesh axes do not divide is
replicated instead (tiny test models, odd head counts), so the same code runs on 1 device
and on any mesh.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple, Union

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor", "expert")

# logical name -> mesh axis, tuple of mesh axes, or None (replicated).
RULES: Tuple[Tuple[str, Union[None, str, Tuple[str, ...]]], ...] = (
    ("batch", ("data", "fsdp")),
    ("expert", "expert"),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("norm", None),
    ("cache_slots", None),
)

# (dim, fallback dim): mesh axes that do not divide `dim` go to `fallback` in the same array
# when it has one. A router with 4 kv heads under 8-way tensor parallelism would otherwise
# hold its whole KV cache on every chip; its rows are split over `tensor` instead.
FALLBACKS: Tuple[Tuple[str, str], ...] = (
    ("kv_heads", "batch"),
)

KV_CACHE_AXES = {
    "k": ("batch", "layers", "kv_heads", "cache_slots", "head_dim"),
    "v": ("batch", "layers", "kv_heads", "cache_slots", "head_dim"),
    "pos": ("batch", "cache_slots"),
    "end": ("batch",),
    "next_pos": ("batch",),
}


def mesh_sizes(shape: Optional[Dict[str, int]], n_devices: int) -> Dict[str, int]:
    """{axis: size} over MESH_AXES for `n_devices` devices: missing axes 1, one axis may be
    -1 (the rest). ValueError unless the sizes are positive and multiply to n_devices."""
    shape = dict(shape or {})
    unknown = set(shape) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"unknown mesh axes {sorted(unknown)}; the mesh axes are {MESH_AXES}")
    sizes = [int(shape.get(a, 1)) for a in MESH_AXES]
    written = " x ".join(f"{a}={s}" for a, s in zip(MESH_AXES, sizes))
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh {written}: at most one mesh axis may be -1")
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh {written}: sizes must be positive (or -1 for the rest)")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if n_devices % known:
            raise ValueError(f"mesh {written} does not divide {n_devices} devices")
        sizes[sizes.index(-1)] = n_devices // known
    if int(np.prod(sizes)) != n_devices:
        raise ValueError(f"mesh {written} needs {int(np.prod(sizes))} devices but "
                         f"{n_devices} are available; set one axis to -1")
    return dict(zip(MESH_AXES, sizes))


def make_mesh(shape: Optional[Dict[str, int]] = None, devices=None) -> Mesh:
    """A mesh over MESH_AXES; `shape` gives each axis' size, one of them may be -1 (the rest).

    Missing axes have size 1. The product must equal the number of devices.
    """
    devices = list(devices if devices is not None else jax.devices())
    sizes = list(mesh_sizes(shape, len(devices)).values())
    # Auto axes: shardings of params, caches and batches are given at the jit boundary and
    # XLA's partitioner propagates them through the model code, which stays mesh-agnostic.
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    if devices == list(jax.devices()):
        return jax.make_mesh(tuple(sizes), MESH_AXES, devices=devices, axis_types=auto)
    return Mesh(np.array(devices).reshape(sizes), MESH_AXES, axis_types=auto)


def _mesh_axes(name, rules):
    for logical, mesh_axes in rules:
        if logical == name:
            return mesh_axes
    raise KeyError(f"logical axis {name!r} has no entry in the sharding rules")


def spec_for(logical: Sequence[Optional[str]], shape: Sequence[int], mesh: Mesh,
             rules=RULES, fallbacks=FALLBACKS) -> P:
    """PartitionSpec for an array of `shape` whose dims carry `logical` names.

    Mesh axes of size 1, axes already used by an earlier dim, and axes that do not divide
    the dim are dropped (that part of the dim is replicated), except that axes a dim cannot
    divide are offered to its fallback dim (`FALLBACKS`), if the array has one.
    """
    used = set()
    keeps, undivided = [], {}

    def take(axes, size, keep):
        for a in axes:
            n = mesh.shape[a]
            if n == 1 or a in used:
                continue
            if size % (n * int(np.prod([mesh.shape[k] for k in keep]))):
                yield a
                continue
            keep.append(a)
            used.add(a)

    for name, size in zip(logical, shape):
        axes = _mesh_axes(name, rules) if name is not None else None
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        keep = []
        undivided[name] = list(take(axes, size, keep))
        keeps.append(keep)
    for src, dst in fallbacks:
        if undivided.get(src) and dst in logical:
            i = list(logical).index(dst)
            list(take(undivided[src], shape[i], keeps[i]))
    return P(*(None if not k else k[0] if len(k) == 1 else tuple(k) for k in keeps))


def shardings_for(logical_tree, shape_tree, mesh: Mesh, rules=RULES):
    """Params-shaped NamedShardings from logical PartitionSpecs and shapes."""
    return jax.tree.map(
        lambda spec, x: NamedSharding(mesh, spec_for(tuple(spec), x.shape, mesh, rules)),
        logical_tree, shape_tree, is_leaf=lambda x: isinstance(x, P))


def cache_shardings(cache, mesh: Mesh, leading: Tuple[str, ...] = (), rules=RULES):
    """Shardings of a KVCache (or an expert-stacked one with leading=("expert",))."""
    axes = {k: leading + v for k, v in KV_CACHE_AXES.items()}
    return cache.__class__(**{k: NamedSharding(mesh, spec_for(axes[k], getattr(cache, k).shape,
                                                              mesh, rules))
                              for k in axes})


def batch_sharding(mesh: Mesh, shape: Sequence[int], rules=RULES) -> NamedSharding:
    """[batch, ...] arrays: batch over data/fsdp, the rest replicated."""
    return NamedSharding(mesh, spec_for(("batch",) + (None,) * (len(shape) - 1), shape, mesh,
                                        rules))


def row_holders(mesh: Mesh, rows: int, rules=RULES) -> List[Tuple[int, int, frozenset]]:
    """How a batch of `rows` rows sharded by `batch_sharding` lies on the processes: its
    row blocks (start, stop, the processes whose devices hold that block), in row order."""
    placed = batch_sharding(mesh, (rows,), rules).devices_indices_map((rows,))
    blocks: Dict[Tuple[int, int], set] = {}
    for device, (index,) in placed.items():
        start, stop, _ = index.indices(rows)
        blocks.setdefault((start, stop), set()).add(device.process_index)
    return [(a, b, frozenset(p)) for (a, b), p in sorted(blocks.items())]


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def param_shardings(models, mesh: Mesh, rules=RULES):
    """Shardings for the params of a `Model`, `Router` or `Experts` (anything with
    `logical_axes()` and `param_shapes()`)."""
    return shardings_for(models.logical_axes(), models.param_shapes(), mesh, rules)


def constrain(x, logical: Sequence[Optional[str]], rules=RULES):
    """Pins activation x to the sharding its logical axis names map to (dims named None
    are left to XLA), under the mesh the caller traces in (`traced_on`); a no-op when no
    mesh is set (one device, tests).

    Without these pins XLA's propagation may choose to shard an activation like the weight
    it meets (e.g. [B, T, E] by `embed` over fsdp), replicating the rows and every FLOP."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    spec = spec_for(logical, x.shape, mesh, rules)
    # Dims named None are left to XLA's propagation; only the named ones are pinned.
    spec = P(*(P.UNCONSTRAINED if name is None else s for name, s in zip(logical, spec)))
    return jax.lax.with_sharding_constraint(x, spec)


def traced_on(fn, mesh: Optional[Mesh]):
    """fn, traced with `mesh` set, so the activation pins of `constrain` take effect."""
    if mesh is None:
        return fn

    def wrapped(*args, **kwargs):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return fn(*args, **kwargs)
    return wrapped


def mesh_from_config(mesh_cfg) -> Mesh:
    """`config.mesh` (data/fsdp/tensor/expert sizes, one may be -1) -> Mesh."""
    return make_mesh({a: int(mesh_cfg.get(a, 1)) for a in MESH_AXES})
