"""Compiling the programs for the slice and reading what the compiler says: memory per
chip (the real program at full depth), FLOPs (the same program at depth 1 and 2, every scan
unrolled, extrapolated in depth), HBM bytes and collectives (fr_jax.aot.hlo_traffic over the
optimized HLO).

The time model: a step takes at least FLOPs / peak, HBM bytes / HBM bandwidth and its
collectives' time on the wire, each alone. A collective costs each participant its ring
bytes (`hlo_traffic.ring_factor`: an all-reduce 2(n-1)/n x its buffer, an all-gather or a
reduce-scatter (n-1)/n x the whole buffer, an all-to-all (n-1)/n, a permute its buffer) sent
at the chip's ICI rate, half its published bidirectional bandwidth (`Chip.ici_send_bw`):
every port of the torus busy, no latency, no hops. That is optimistic for a group spanning
one dimension of the torus (it has 2 of the chip's 4 or 6 ports), and for small collectives,
which latency bounds. Two bounds come of it: full overlap, the largest of the three times,
and no overlap, the larger of compute and memory plus the collectives. MFU and the
roofline share at full overlap are ceilings; at no overlap they are not forecasts either,
since every term is itself a lower bound."""

from __future__ import annotations

import dataclasses
import glob
import os
import re
import sys
import tempfile
from typing import Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from fr_jax import steps
from fr_jax.aot.hlo_traffic import collectives, hbm_bytes
from fr_jax.aot.programs import Program, all_programs, decode_programs, serve_programs
from fr_jax.aot.shapes import model_config
from fr_jax.config import decode_mesh, frozen_dtype
from fr_jax.runtime import sharding as sh
from fr_jax.runtime.hardware import Chip, GiB


# ---------------------------------------------------------------------------- compiling
@dataclasses.dataclass
class Result:
    program: str
    kind: str
    fits: bool
    total: float  # bytes per chip (params + state + temporaries + outputs not aliased)
    usable: float
    parts: Dict[str, float]  # per-chip bytes of each argument group, and temporaries
    flops: Optional[float] = None  # per chip per step (compiler, extrapolated in depth)
    hbm_bytes: Optional[float] = None  # fr_jax.aot.hlo_traffic's count
    xla_bytes: Optional[float] = None  # XLA's "bytes accessed" (counts on-chip copies too)
    # per chip per step, by kind: count, bytes (whole buffers), wire (ring bytes), seconds
    collectives: Dict[str, Dict[str, float]] = dataclasses.field(default_factory=dict)
    collective_s: Optional[float] = None  # their time on the wire
    step_overlap_s: Optional[float] = None  # max(compute, memory, collectives): a floor
    step_no_overlap_s: Optional[float] = None  # max(compute, memory) + collectives
    mfu_ceiling: Optional[float] = None  # model FLOPs over the full-overlap step
    mfu_no_overlap: Optional[float] = None
    roofline_ceiling: Optional[float] = None  # bytes a decode step must read, same
    roofline_no_overlap: Optional[float] = None
    error: str = ""
    largest: List[str] = dataclasses.field(default_factory=list)


def _per_chip(tree) -> float:
    total = 0
    for x in jax.tree.leaves(tree):
        shape = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) else x.shape
        total += int(np.prod(shape)) * jnp.dtype(x.dtype).itemsize
    return float(total)


def compile_program(p: Program, dump_dir: Optional[str] = None):
    """(compiled executable or None, error text) for the program on its mesh's devices."""
    opts = {"xla_dump_to": dump_dir} if dump_dir else {}
    try:
        return p.fn.lower(*p.args).compile(compiler_options=opts), ""
    except Exception as e:  # the compiler's out-of-memory verdict, among others
        return None, str(e).splitlines()[0][:400]


def largest_buffers(dump_dir: str, top: int = 6) -> List[str]:
    """The biggest allocations of the compiled (or rejected) program, from XLA's
    buffer-assignment dump: size, shape and the JAX op that made the biggest value."""
    files = sorted(glob.glob(os.path.join(dump_dir, "*after_optimizations-buffer-assignment.txt")))
    if not files:
        return []
    text = open(files[-1]).read()
    hlo_files = glob.glob(os.path.join(dump_dir, "*after_optimizations_before_buffer_assignment.txt"))
    ops = {}
    if hlo_files:
        for m in re.finditer(r"%([\w.\-]+) = [^\n]*?op_name=\"([^\"]+)\"", open(hlo_files[-1]).read()):
            ops.setdefault(m.group(1), m.group(2))
    allocs = []
    for block in re.split(r"\nallocation \d+: ", "\n" + text)[1:]:
        head = block.split("\n", 1)[0]
        size = int(re.match(r"size (\d+)", head).group(1))
        values = re.findall(r"value: <\d+ ([\w.\-]+)(?:\{[\d,]*\})? @\d+> \(size=(\d+)[^)]*\): "
                            r"([^\s]+)", block)
        if not values:
            continue
        name, _, shape = max(values, key=lambda v: int(v[1]))
        kind = "parameter" if "parameter" in head else "output" if "output" in head else "temp"
        allocs.append((size, kind, re.sub(r"\{.*", "", shape), ops.get(name, name)))
    allocs.sort(key=lambda a: -a[0])
    return [f"{s / GiB:6.2f} GiB {k:9s} {shape}  <- {op[-110:]}"
            for s, k, shape, op in allocs[:top]]


def _costs(compiled) -> Tuple[float, float]:
    """(FLOPs, bytes accessed) of a compiled program per chip, from XLA's cost analysis."""
    ca = compiled.cost_analysis()
    ca = ca[0] if isinstance(ca, (list, tuple)) else ca
    return float(ca.get("flops", 0.0)), float(ca.get("bytes accessed", 0.0))


def shallow(cfg, depth: int):
    """The same model at `depth` layers with its scans unrolled (cost analysis); a model
    already cut shallower (plan.depth) repeats its layer pattern."""
    types = tuple(cfg.layer_types) * -(-depth // len(cfg.layer_types))
    return cfg.replace(num_layers=depth, scan_unroll=True, layer_types=types[:depth])


def measure_costs(config, rcfg, ecfgs, meshes, programs: Sequence[Program],
                  progress: bool = False, build=all_programs) -> Dict[str, Tuple[float, float]]:
    """Per costed program: (FLOPs, XLA's bytes accessed) per chip per step at full depth,
    extrapolated from the program unrolled at router/expert depths (1, 1), (2, 1), (1, 2):
    cost = c11 + (Lr - 1)(c21 - c11) + (Le - 1)(c12 - c11); a program that runs only the
    router (or only the experts) needs two of the three. A training step is costed as one
    micro-batch times their number (unrolled, the micro-batches would all be alive at once
    and the variant may not fit the chip). `build` makes the programs (all_programs'
    signature)."""
    want = {p.name: p for p in programs if p.costed}
    one_micro = config.copy_and_resolve_references()
    one_micro.train.batch_size = steps.micro_batch_size(config.train)
    one_micro.train.grad_accum = 1
    variants: Dict[str, Dict[Tuple[int, int], np.ndarray]] = {}
    for dr, de in ((1, 1), (2, 1), (1, 2)):
        progs = build(one_micro, shallow(rcfg, dr), [shallow(c, de) for c in ecfgs], meshes,
                      single_expert=True)
        for p in progs:
            full = want.get(p.name)
            if full is None or (dr == 2 and "router" not in full.uses) or (
                    de == 2 and "experts" not in full.uses):
                continue
            if progress:
                print(f"[plan] cost of {p.name} at depth {dr}/{de}", file=sys.stderr, flush=True)
            compiled, _ = compile_program(p)
            if compiled is not None:
                variants.setdefault(p.name, {})[(dr, de)] = full.accum * np.array(
                    _costs(compiled))
    out = {}
    for name, v in variants.items():
        if (1, 1) not in v:
            continue
        c = v[(1, 1)].copy()
        for key, depth in (((2, 1), rcfg.num_layers), ((1, 2), ecfgs[0].num_layers)):
            if key in v:
                c += (depth - 1) * (v[key] - v[(1, 1)])
        out[name] = tuple(float(x) for x in c)
    return out


def _memory(p: Program, compiled, err: str, dump: str, usable: float,
            headroom: float) -> Result:
    parts = {k: _per_chip(v) for k, v in p.groups.items()}
    # What the run holds beside the program's arguments (see Program.resident).
    resident = sum(_per_chip(v) for v in p.resident.values())
    if p.resident:
        parts["resident"] = resident
    if compiled is None:
        m = re.search(r"HLO temporaries \(([\d.]+)G\)", err)
        temp = float(m.group(1)) * GiB if m else float("nan")
        return Result(p.name, p.kind, False, sum(parts.values()) + temp, usable,
                      dict(parts, temporaries=temp), error=err, largest=largest_buffers(dump))
    ma = compiled.memory_analysis()
    total = float(ma.argument_size_in_bytes + ma.output_size_in_bytes - ma.alias_size_in_bytes
                  + ma.temp_size_in_bytes + ma.generated_code_size_in_bytes) + resident
    fits = total <= usable * (1 - headroom)
    return Result(p.name, p.kind, fits, total, usable,
                  dict(parts, temporaries=float(ma.temp_size_in_bytes)),
                  largest=[] if fits else largest_buffers(dump))


def _traffic(dump: str, steps: int, ici_bw: float):
    """(HBM bytes, collectives) per step of the program XLA dumped to `dump`: every loop
    counted as many times as it runs (fr_jax.aot.hlo_traffic), over the `steps` one run makes;
    None where nothing was dumped. Collectives' seconds at `ici_bw` bytes/s sent per chip."""
    files = glob.glob(os.path.join(dump, "*after_optimizations.txt"))
    if not files:
        return None
    with open(max(files, key=os.path.getsize)) as f:
        text = f.read()
    per_step = {kind: {k: v / steps for k, v in stats.items()}
                for kind, stats in collectives(text, trips=True).items() if stats["count"]}
    for stats in per_step.values():
        stats["seconds"] = stats["wire"] / ici_bw
    return hbm_bytes(text, trips=True) / steps, per_step


def step_time(r: Result, p: Program, chip: Chip, n_chips: int):
    """Fills r's step-time bounds, MFU and roofline share from its FLOPs, bytes and
    collectives (the model in this module's docstring)."""
    r.collective_s = sum(c["seconds"] for c in r.collectives.values())
    busy = max(r.flops / chip.peak_flops, r.hbm_bytes / chip.hbm_bw)
    r.step_overlap_s = max(busy, r.collective_s)
    r.step_no_overlap_s = busy + r.collective_s
    if p.kind == "train" and p.model_flops:
        useful = p.model_flops / n_chips / chip.peak_flops
        r.mfu_ceiling, r.mfu_no_overlap = useful / r.step_overlap_s, useful / r.step_no_overlap_s
    if p.roofline_bytes:
        floor = p.roofline_bytes / n_chips / chip.hbm_bw
        r.roofline_ceiling = floor / r.step_overlap_s
        r.roofline_no_overlap = floor / r.step_no_overlap_s


def evaluate(config, chip: Chip, devices, progress: bool = True,
             build=all_programs, hosts: int = 1) -> List[Result]:
    """Compiles every program of `config` (made by `build`, all_programs' signature) for
    the slice, whose launch starts `hosts` processes, and returns one Result each."""
    pc = config.plan
    meshes = {kind: sh.make_mesh({a: int(m.get(a, 1)) for a in sh.MESH_AXES}, devices)
              for kind, m in (("train", config.mesh), ("decode", decode_mesh(config)))}
    dtype, pdtype = config.model.dtype, config.model.param_dtype or config.model.dtype
    rcfg = model_config(config.router.path, pc.router_arch, dtype, pdtype, "router")
    n = len(config.experts.paths) or pc.n_experts
    paths = list(config.experts.paths) or [""] * n
    ecfgs = [model_config(p, pc.expert_arch, dtype, frozen_dtype(config), "expert")
             for p in paths]
    if pc.depth:  # reduced depth (tests): real widths and vocabularies, fewer layers
        cut = lambda c: c.replace(num_layers=pc.depth, layer_types=c.layer_types[:pc.depth])
        rcfg, ecfgs = cut(rcfg), [cut(c) for c in ecfgs]
    programs = build(config, rcfg, ecfgs, meshes, hosts=hosts)
    # A lazy decode step runs the router and the one selected expert (which one depends on
    # the data): its HBM traffic is that of a one-expert lineup's step, compiled as well.
    standins = {}
    if pc.costs and "decode" in pc.programs and any(pc.lazy):
        standins = {p.name: p for p in decode_programs(
            config, rcfg, ecfgs, meshes["decode"], tuple(pc.decode_modes),
            tuple(pc.decode_batches), (True,), single_expert=True) if p.costed}
    if pc.costs and "serve" in pc.programs and config.decode.lazy_experts:
        standins.update({p.name: p for p in serve_programs(
            config, rcfg, ecfgs, meshes["decode"], single_expert=True) if p.costed})
    usable = chip.usable_gib * GiB
    results, traffic = [], {}
    for i, p in enumerate(programs):
        if progress:
            print(f"[plan] compiling {i + 1}/{len(programs)}: {p.name}", file=sys.stderr,
                  flush=True)
        with tempfile.TemporaryDirectory() as dump:
            compiled, err = compile_program(p, dump)
            results.append(_memory(p, compiled, err, dump, usable, pc.headroom))
            if compiled is not None and p.costed and pc.costs and p.name not in standins:
                traffic[p.name] = _traffic(dump, p.steps, chip.ici_send_bw)
        if p.name in standins:
            with tempfile.TemporaryDirectory() as dump:
                if progress:
                    print(f"[plan] traffic of {p.name} (router + one expert)", file=sys.stderr,
                          flush=True)
                if compile_program(standins[p.name], dump)[0] is not None:
                    traffic[p.name] = _traffic(dump, p.steps, chip.ici_send_bw)
    if pc.costs:
        if progress:
            print("[plan] FLOPs (depth 1 and 2, unrolled)", file=sys.stderr, flush=True)
        costs = measure_costs(config, rcfg, ecfgs, meshes, programs, progress, build)
        n_chips = len(devices)
        for p, r in zip(programs, results):
            if p.name not in costs:
                continue
            r.flops, r.xla_bytes = costs[p.name]
            r.flops += p.kernel_flops / n_chips
            if traffic.get(p.name) is None:
                continue  # the program itself did not compile: no step time
            r.hbm_bytes, r.collectives = traffic[p.name]
            step_time(r, p, chip, n_chips)
    return results
