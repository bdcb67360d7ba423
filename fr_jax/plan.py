"""Will it fit, and how fast will it run? Every program a config runs, compiled ahead of time
by the TPU compiler for a TPU slice, on a machine with no TPU.

    python -m fr_jax.plan --config=configs/gemma2.py --topology=v5e-8
    python -m fr_jax.plan --config=configs/llama3.py --topology=v4-16 --config.train.batch_size=64

`libtpu` (`pip install -e ".[tpu]"`) provides the compiler; `jax.experimental.topologies`
describes the slice's chips, and fr_jax's own jitted programs (the training stages' steps, the
expert-signal precompute, the fused decoder's prefill and chunk) are lowered from abstract
params (`jax.ShapeDtypeStruct`s at the checkpoints' shapes: their `config.json` when the
folders exist, else a built-in preset of the public architecture) and compiled for the slice.
Per chip, the table shows what the compiler allocates (params, optimizer state, frozen
models, caches, temporaries) against the chip's HBM, the FLOPs and HBM bytes of one step,
the step time they predict, the MFU of training steps and the share of the HBM roofline of
decode steps. The exit status is 0 only if every program fits with `plan.headroom` to spare;
for one that does not, the largest buffers (shape, the op that made them) are listed.

XLA's cost analysis counts a loop body once, and fr_jax scans its layers, its loss blocks and
its micro-batches. So FLOPs come from the same program at depth 1 and 2 with every scan
unrolled (`ModelConfig.scan_unroll`), extrapolated linearly in depth, plus the FLOPs of the
fused attention kernel, which the cost analysis cannot see. HBM bytes come from the real
program's optimized HLO (`fr_jax.hlo_traffic`: what crosses HBM, every loop as many times as
it runs; XLA's own count also counts the compiler's prefetches into on-chip memory), and
memory from the real program at full depth.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
import re
import sys
import tempfile
from typing import Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from fr_jax import sharding as sh
from fr_jax import train
from fr_jax.config import decode_mesh, default_config_file, frozen_dtype, parse_flags
from fr_jax.decode import FusedDecoder, experts_layout
from fr_jax.experts import Experts
from fr_jax.fusion import Mode
from fr_jax.hf import load_config
from fr_jax.hlo_traffic import hbm_bytes
from fr_jax.models import ModelConfig
from fr_jax.models.splash import block_size
from fr_jax.router import Router

GiB = 1 << 30


# ---------------------------------------------------------------------------- the hardware
@dataclasses.dataclass(frozen=True)
class Chip:
    """One TPU chip (a megacore chip for v4 / v5p): HBM, and the peaks that bound a step."""

    name: str
    hbm_gib: float  # physical
    usable_gib: float  # what the compiler may allocate (its "available HBM")
    peak_flops: float  # bf16 FLOP/s
    hbm_bw: float  # bytes/s


CHIPS = {
    "v4": Chip("TPU v4", 32, 30.75, 275e12, 1.228e12),
    "v5e": Chip("TPU v5e", 16, 15.75, 197e12, 0.819e12),
    "v5p": Chip("TPU v5p", 95, 95.74, 459e12, 2.765e12),
    "v6e": Chip("TPU v6e", 32, 31.25, 918e12, 1.64e12),
}

# slice name -> (chip, topology for jax.experimental.topologies). v4 and v5p slices are
# named by TensorCores: v4-8 is 4 megacore chips.
SLICES = {
    "v4-8": ("v4", "v4:2x2x1"), "v4-16": ("v4", "v4:2x2x2"), "v4-32": ("v4", "v4:2x2x4"),
    "v5e-4": ("v5e", "v5e:2x2"), "v5e-8": ("v5e", "v5e:2x4"), "v5e-16": ("v5e", "v5e:4x4"),
    "v5e-32": ("v5e", "v5e:4x8"), "v5e-64": ("v5e", "v5e:8x8"),
    "v5p-8": ("v5p", "v5p:2x2x1"), "v5p-16": ("v5p", "v5p:2x2x2"),
    "v6e-8": ("v6e", "v6e:2x4"), "v6e-16": ("v6e", "v6e:4x4"),
}


class PlanError(ValueError):
    """A plan that cannot be made (names the problem and the fix)."""


def check_slice(slice_name: str):
    if slice_name not in SLICES:
        raise PlanError(f"unknown TPU slice {slice_name!r}; known: {', '.join(SLICES)}")


def topology_devices(slice_name: str):
    """(Chip, the slice's TPU devices) -- abstract devices a Mesh can be built on."""
    check_slice(slice_name)
    chip, topo = SLICES[slice_name]
    # Compiling claims no TPU: let several plans (and a TPU job) load libtpu side by side
    # instead of failing on its single-process lock file.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        from jax.experimental import topologies
        kw = {"chip_config_name": "megacore"} if chip in ("v4", "v5p") else {}
        desc = topologies.get_topology_desc(platform="tpu", topology_name=topo, **kw)
    except Exception as e:  # no libtpu, or a jax without TPU AOT support
        raise PlanError(f"cannot describe TPU topology {topo!r} ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:200]}); the TPU compiler comes with libtpu: "
                        'pip install -e ".[tpu]"') from None
    return CHIPS[chip], list(desc.devices)


# ---------------------------------------------------------------------------- the models
def _llama(hidden, inter, layers, heads, kv, head_dim, tie, factor, theta=500000.0):
    return dict(model_type="llama", vocab_size=128256, hidden_size=hidden,
                intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
                num_key_value_heads=kv, head_dim=head_dim, tie_word_embeddings=tie,
                rms_norm_eps=1e-5, max_position_embeddings=131072, hidden_act="silu",
                rope_theta=theta, rope_scaling=dict(rope_type="llama3", factor=factor,
                                                    low_freq_factor=1.0, high_freq_factor=4.0,
                                                    original_max_position_embeddings=8192),
                bos_token_id=128000, eos_token_id=[128001, 128009])


def _gemma2(hidden, inter, layers, heads, kv, head_dim, qpas):
    return dict(model_type="gemma2", vocab_size=256000, hidden_size=hidden,
                intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
                num_key_value_heads=kv, head_dim=head_dim, query_pre_attn_scalar=qpas,
                attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                sliding_window=4096, rms_norm_eps=1e-6, max_position_embeddings=8192,
                hidden_activation="gelu_pytorch_tanh", rope_theta=10000.0,
                bos_token_id=2, eos_token_id=[1, 107], pad_token_id=0)


# The public architectures' config.json fields (as published with the checkpoints).
PRESETS = {
    "llama-3.2-1b": _llama(2048, 8192, 16, 32, 8, 64, True, 32.0),
    "llama-3.2-3b": _llama(3072, 8192, 28, 24, 8, 128, True, 32.0),
    "llama-3.1-8b": _llama(4096, 14336, 32, 32, 8, 128, False, 8.0),
    "llama-3.1-70b": _llama(8192, 28672, 80, 64, 8, 128, False, 8.0),
    "gemma-2-2b": _gemma2(2304, 9216, 26, 8, 4, 256, 256),
    "gemma-2-9b": _gemma2(3584, 14336, 42, 16, 8, 256, 256),
    "gemma-2-27b": _gemma2(4608, 36864, 46, 32, 16, 128, 144),
}


def model_config(path: str, arch: str, dtype: str, param_dtype: str, what: str):
    """ModelConfig of a checkpoint: its config.json if the folder has one, else preset `arch`."""
    if path and os.path.isfile(os.path.join(path, "config.json")):
        return load_config(path, dtype, param_dtype)
    if arch not in PRESETS:
        where = f"{path!r} has no config.json" if path else "no checkpoint path is set"
        raise PlanError(f"{what}: {where}, and plan.{what}_arch={arch!r} names no preset; set "
                        f"--config.plan.{what}_arch to one of {', '.join(PRESETS)}")
    return ModelConfig.from_hf(PRESETS[arch], dtype=dtype, param_dtype=param_dtype,
                               source=f"preset {arch}")


def _layer_params(cfg) -> int:
    e, h, k, d, f = (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                     cfg.intermediate_size)
    return e * (h + 2 * k) * d + h * d * e + 3 * e * f


def forward_flops(cfg, tokens: int, context: float) -> float:
    """Model FLOPs of a forward pass over `tokens` tokens that each attend to `context` keys
    on average: 2 x (the layers' weight matmuls + the LM head) + 4 x heads x head_dim x
    context per layer (scores and the weighted sum)."""
    per_token = 2 * (cfg.num_layers * _layer_params(cfg) + cfg.hidden_size * cfg.vocab_size)
    per_token += 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim * context
    return per_token * tokens


def splash_flops(cfg, rows: int, seq: int, forwards: int, backward: bool) -> float:
    """FLOPs of the fused attention kernel (fr_jax.models.splash) in one program, which
    XLA's cost analysis cannot see inside (a Mosaic custom call): each of its T x T x D
    matmuls costs 2 T^2 D per head and layer over the causal tiles it visits; a forward
    runs 2 of them, a backward 7 (dq: 3, dk and dv: 4). 0 when the model runs einsums."""
    if cfg.attention not in ("auto", "splash") or seq % 128:
        return 0.0
    nb = seq // block_size(seq)
    visited = (nb + 1) / (2 * nb)  # tiles on or below the diagonal
    matmul = 2.0 * rows * seq * seq * visited * cfg.num_heads * cfg.head_dim * cfg.num_layers
    return matmul * (2 * forwards + 7 * backward)


# ---------------------------------------------------------------------------- programs
@dataclasses.dataclass
class Program:
    """One jitted program with the abstract arguments to lower it with."""

    name: str
    kind: str  # train | decode
    fn: object
    args: tuple
    groups: Dict[str, object]  # what each argument group is: {label: pytree of args}
    model_flops: float = 0.0  # useful FLOPs per step (all chips), for MFU
    roofline_bytes: float = 0.0  # bytes a decode step must read (all chips)
    kernel_flops: float = 0.0  # FLOPs inside custom calls (all chips), added to XLA's count
    steps: int = 1  # steps one run makes (a decode chunk: its tokens)
    accum: int = 1  # micro-batches of one training step (its cost: one micro-batch's x accum)
    uses: Tuple[str, ...] = ("router", "experts")  # whose depth its cost grows with
    costed: bool = True  # FLOPs / bytes / step time are measured (steps, not prefills)


def _abstract(shapes, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        shapes, shardings)


def _sft_rows(rows, seq, n_experts=0):
    out = {k: jax.ShapeDtypeStruct((rows, seq), jnp.int32)
           for k in ("tokens", "targets", "positions", "segment_ids")}
    out["loss_mask"] = jax.ShapeDtypeStruct((rows, seq), jnp.float32)
    if n_experts:
        out["signal_logprob"] = jax.ShapeDtypeStruct((rows, seq, n_experts), jnp.float32)
        out["signal_top1"] = jax.ShapeDtypeStruct((rows, seq, n_experts), jnp.int32)
    return out


def _nbytes(tree) -> int:
    return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize
               for x in jax.tree.leaves(tree))


def train_programs(config, rcfg, ecfgs, mesh, stages: Sequence[str]) -> List[Program]:
    """The training programs of config.train.stages: the SFT step (and the expert-signal
    precompute when signals are precomputed), the CDPO step."""
    tc, seq = config.train, config.data.seq_len
    n, vocab = len(ecfgs), min(c.vocab_size for c in [rcfg, *ecfgs])
    micro = train.micro_batch_size(tc)
    router = Router(train.trained_cfg(rcfg, config), n)
    experts = Experts([train.frozen_cfg(c, config).replace(param_dtype=frozen_dtype(config))
                       for c in ecfgs], vocab=vocab)
    r_params = _abstract(router.param_shapes(), sh.param_shardings(router, mesh))
    e_params = _abstract(experts.param_shapes(), sh.param_shardings(experts, mesh))
    ref_params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, frozen_dtype(config),
                                                             sharding=x.sharding), r_params)
    tokens = tc.batch_size * seq
    rc, ec = router.cfg, experts.cfgs[0]
    trained_fwd = 1 + (rc.remat != "none")  # a rematerialised layer runs forward twice
    out = []
    for name in stages:
        if name == "sft":
            pre = tc.sft.expert_signals == "precompute"
            if pre:
                fn = train.signals_program(experts, vocab, tc.loss_block, mesh, seq, micro)
                out.append(Program("expert signals (precompute)", "train", fn,
                                   (e_params, _sft_rows(micro, seq)),
                                   {"frozen": e_params},
                                   n * forward_flops(ecfgs[0], micro * seq, (seq + 1) / 2),
                                   uses=("experts",),
                                   kernel_flops=n * splash_flops(ec, micro, seq, 1, False)))
            frozen = {} if pre else {"experts": e_params}
            batch = _sft_rows(tc.batch_size, seq, n if pre else 0)
            flops = 3 * forward_flops(rcfg, tokens, (seq + 1) / 2)
            kernel = splash_flops(rc, tc.batch_size, seq, trained_fwd, True)
            if not pre:
                flops += n * forward_flops(ecfgs[0], tokens, (seq + 1) / 2)
                kernel += n * splash_flops(ec, tc.batch_size, seq, 1, False)
        elif name == "cdpo":
            pre = tc.cdpo.reference == "precompute"
            if pre:
                fn = train.reference_program(router, experts, vocab, tc.loss_block, mesh, seq,
                                             micro)
                side = _sft_rows(micro, seq)
                out.append(Program("CDPO reference (precompute)", "train", fn,
                                   (ref_params, e_params, side),
                                   {"frozen": {"ref": ref_params, "experts": e_params}},
                                   forward_flops(rcfg, micro * seq, (seq + 1) / 2)
                                   + n * forward_flops(ecfgs[0], micro * seq, (seq + 1) / 2),
                                   kernel_flops=splash_flops(rc, micro, seq, 1, False)
                                   + n * splash_flops(ec, micro, seq, 1, False)))
            frozen = {"experts": e_params} if pre else {"experts": e_params, "ref": ref_params}
            side = _sft_rows(tc.batch_size, seq)
            if pre:
                side["ref_logprob"] = jax.ShapeDtypeStruct((tc.batch_size,), jnp.float32)
                side["ref_route_logits"] = jax.ShapeDtypeStruct((tc.batch_size, seq, n),
                                                                jnp.float32)
            batch = {"chosen": side, "rejected": side}
            # both sides: the policy (fwd + bwd), every expert, and the reference router
            # unless its log-probs are precomputed
            flops = 2 * ((3 + (not pre)) * forward_flops(rcfg, tokens, (seq + 1) / 2)
                         + n * forward_flops(ecfgs[0], tokens, (seq + 1) / 2))
            kernel = 2 * (splash_flops(rc, tc.batch_size, seq, trained_fwd + (not pre), True)
                          + n * splash_flops(ec, tc.batch_size, seq, 1, False))
        else:
            continue
        stage = train.build_stage(name, router, experts, mesh, tc[name], tc, r_params, frozen,
                                  vocab)
        state = train.abstract_state(stage, r_params)
        step, _ = stage.jitted(batch)
        out.append(Program(f"{name.upper()} step", "train", step, (state, frozen, batch),
                           {"params": state.params, "optimizer": state.opt_state,
                            "frozen": frozen}, flops,
                           uses=("router", "experts") if frozen else ("router",),
                           kernel_flops=kernel, accum=max(tc.grad_accum, 1)))
    return out


def decode_programs(config, rcfg, ecfgs, mesh, modes: Sequence[str], batches: Sequence[int],
                    lazy_options: Sequence[bool], single_expert: bool = False) -> List[Program]:
    """The fused decoder's prefill and chunk for each mode x lazy/eager x batch, with every
    model in the frozen dtype. With `single_expert` (cost of a lazy step: the router and the
    one selected expert), a one-expert lineup decoded eagerly stands in for each lazy row."""
    pc, dc = config.plan, config.decode
    dt = frozen_dtype(config)
    out = []
    for mode_name in modes:
        for lazy in lazy_options:
            n = 1 if (single_expert and lazy) else len(ecfgs)
            router = Router(rcfg.replace(param_dtype=dt), n)
            vocab = min(c.vocab_size for c in [rcfg, *ecfgs])
            experts = Experts([c.replace(param_dtype=dt) for c in ecfgs[:n]], vocab=vocab,
                              stacked=experts_layout(config))
            mode = Mode.parse(mode_name, n)
            label = "lazy" if lazy else "eager"
            for batch in batches:
                dec = FusedDecoder(mode, router, experts, vocab=vocab, chunk=dc.chunk, mesh=mesh,
                                   lazy_experts=lazy and n > 1,
                                   catch_up_width=dc.catch_up_width)
                if lazy and n > 1 and not dec.lazy:
                    break  # this mode has no lazy schedule
                params = dec.prepare({
                    "router": _abstract(router.param_shapes(), sh.param_shardings(router, mesh)),
                    "experts": _abstract(experts.param_shapes(),
                                         sh.param_shardings(experts, mesh))})
                (pre, pre_args), (chunk, chunk_args) = dec.compiled_programs(
                    params, batch, pc.prompt_len, pc.cache_len)
                caches = _abstract(pre_args[4], dec._cache_shardings(pre_args[4]))
                used = [router.cfg] * bool(dec.router) + (
                    [ecfgs[0]] if (lazy or n == 1) else list(ecfgs[:n]))
                # What a step must read: the weights of the models it runs (of an untied
                # input embedding only the rows looked up) and their caches (every slot).
                weights = (_nbytes(params.get("router", {})) if dec.router else 0) + (
                    _nbytes(params["experts"]) // (len(ecfgs) if lazy else 1))
                weights -= sum(c.vocab_size * c.hidden_size for c in used
                               if not c.tie_word_embeddings) * jnp.dtype(dt).itemsize
                kv_item = jnp.dtype(rcfg.dtype).itemsize  # caches hold activations
                kv = sum(2 * c.num_layers * c.num_kv_heads * c.head_dim for c in used) * (
                    batch * pc.cache_len * kv_item)
                tag = f"{mode_name} {label}, batch {batch}"
                out.append(Program(f"decode prefill, {tag}, prompt {pc.prompt_len}", "decode",
                                   pre, pre_args, {"params": params, "caches": caches},
                                   sum(forward_flops(c, batch * pc.prompt_len,
                                                     (pc.prompt_len + 1) / 2) for c in used),
                                   costed=False))
                out.append(Program(f"decode chunk, {tag}, cache {pc.cache_len}", "decode",
                                   chunk, chunk_args, {"params": params, "caches": caches},
                                   sum(forward_flops(c, batch, pc.cache_len) for c in used),
                                   weights + kv, steps=dc.chunk))
    return out


def all_programs(config, rcfg, ecfgs, meshes, single_expert: bool = False) -> List[Program]:
    """Every program of the config: meshes = {"train": mesh, "decode": mesh}."""
    pc = config.plan
    wanted = set(pc.programs)
    unknown = wanted - {"train", "decode"}
    if unknown:
        raise PlanError(f"plan.programs: unknown {sorted(unknown)}; use 'train' and/or 'decode'")
    out = []
    if "train" in wanted:
        out += train_programs(config, rcfg, ecfgs, meshes["train"], tuple(config.train.stages))
    if "decode" in wanted:
        out += decode_programs(config, rcfg, ecfgs, meshes["decode"], tuple(pc.decode_modes),
                               tuple(pc.decode_batches), tuple(pc.lazy), single_expert)
    return out


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
    hbm_bytes: Optional[float] = None  # fr_jax.hlo_traffic's count
    xla_bytes: Optional[float] = None  # XLA's "bytes accessed" (counts on-chip copies too)
    step_s: Optional[float] = None
    mfu: Optional[float] = None
    roofline: Optional[float] = None
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
    """The same model at `depth` layers with its scans unrolled (cost analysis)."""
    return cfg.replace(num_layers=depth, scan_unroll=True,
                       layer_types=tuple(cfg.layer_types[:depth]))


def measure_costs(config, rcfg, ecfgs, meshes, programs: Sequence[Program],
                  progress: bool = False) -> Dict[str, Tuple[float, float]]:
    """Per costed program: (FLOPs, XLA's bytes accessed) per chip per step at full depth,
    extrapolated from the program unrolled at router/expert depths (1, 1), (2, 1), (1, 2):
    cost = c11 + (Lr - 1)(c21 - c11) + (Le - 1)(c12 - c11); a program that runs only the
    router (or only the experts) needs two of the three. A training step is costed as one
    micro-batch times their number (unrolled, the micro-batches would all be alive at once
    and the variant may not fit the chip)."""
    want = {p.name: p for p in programs if p.costed}
    one_micro = config.copy_and_resolve_references()
    one_micro.train.batch_size = train.micro_batch_size(config.train)
    one_micro.train.grad_accum = 1
    variants: Dict[str, Dict[Tuple[int, int], np.ndarray]] = {}
    for dr, de in ((1, 1), (2, 1), (1, 2)):
        progs = all_programs(one_micro, shallow(rcfg, dr), [shallow(c, de) for c in ecfgs],
                             meshes, single_expert=True)
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
    if compiled is None:
        m = re.search(r"HLO temporaries \(([\d.]+)G\)", err)
        temp = float(m.group(1)) * GiB if m else float("nan")
        return Result(p.name, p.kind, False, sum(parts.values()) + temp, usable,
                      dict(parts, temporaries=temp), error=err, largest=largest_buffers(dump))
    ma = compiled.memory_analysis()
    total = float(ma.argument_size_in_bytes + ma.output_size_in_bytes - ma.alias_size_in_bytes
                  + ma.temp_size_in_bytes + ma.generated_code_size_in_bytes)
    fits = total <= usable * (1 - headroom)
    return Result(p.name, p.kind, fits, total, usable,
                  dict(parts, temporaries=float(ma.temp_size_in_bytes)),
                  largest=[] if fits else largest_buffers(dump))


def _traffic(dump: str, steps: int) -> Optional[float]:
    """HBM bytes per step of the program XLA dumped to `dump`: every loop counted as many
    times as it runs (fr_jax.hlo_traffic), over the `steps` one run makes."""
    files = glob.glob(os.path.join(dump, "*after_optimizations.txt"))
    if not files:
        return None
    with open(max(files, key=os.path.getsize)) as f:
        return hbm_bytes(f.read(), trips=True) / steps


def evaluate(config, chip: Chip, devices, progress: bool = True) -> List[Result]:
    """Compiles every program of `config` for the slice and returns one Result each."""
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
    programs = all_programs(config, rcfg, ecfgs, meshes)
    # A lazy decode step runs the router and the one selected expert (which one depends on
    # the data): its HBM traffic is that of a one-expert lineup's step, compiled as well.
    standins = {}
    if pc.costs and "decode" in pc.programs and any(pc.lazy):
        standins = {p.name: p for p in decode_programs(
            config, rcfg, ecfgs, meshes["decode"], tuple(pc.decode_modes),
            tuple(pc.decode_batches), (True,), single_expert=True) if p.costed}
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
                traffic[p.name] = _traffic(dump, p.steps)
        if p.name in standins:
            with tempfile.TemporaryDirectory() as dump:
                if progress:
                    print(f"[plan] traffic of {p.name} (router + one expert)", file=sys.stderr,
                          flush=True)
                if compile_program(standins[p.name], dump)[0] is not None:
                    traffic[p.name] = _traffic(dump, p.steps)
    if pc.costs:
        if progress:
            print("[plan] FLOPs (depth 1 and 2, unrolled)", file=sys.stderr, flush=True)
        costs = measure_costs(config, rcfg, ecfgs, meshes, programs, progress)
        n_chips = len(devices)
        for p, r in zip(programs, results):
            if p.name not in costs:
                continue
            r.flops, r.xla_bytes = costs[p.name]
            r.flops += p.kernel_flops / n_chips
            r.hbm_bytes = traffic.get(p.name)
            if r.hbm_bytes is None:
                continue  # the program itself did not compile: no step time
            r.step_s = max(r.flops / chip.peak_flops, r.hbm_bytes / chip.hbm_bw)
            if p.kind == "train" and p.model_flops:
                r.mfu = p.model_flops / n_chips / (r.step_s * chip.peak_flops)
            if p.roofline_bytes:
                r.roofline = p.roofline_bytes / n_chips / chip.hbm_bw / r.step_s
    return results


# ---------------------------------------------------------------------------- reporting
def _gib(x):
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x / GiB:.2f}"


def table(results: Sequence[Result], slice_name: str, chip: Chip) -> str:
    head = (f"Per chip on {slice_name} ({chip.name}, {chip.usable_gib} GiB usable HBM, "
            f"{chip.peak_flops / 1e12:.0f} TFLOP/s bf16, {chip.hbm_bw / 1e9:.0f} GB/s)")
    rows = ["| program | params | optimizer | frozen | caches | temporaries | total GiB "
            "| HBM used | fits | TFLOPs/step | HBM GB/step | step (ms) | MFU | roofline |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        p = r.parts
        rows.append(
            f"| {r.program} | {_gib(p.get('params'))} | {_gib(p.get('optimizer'))} | "
            f"{_gib(p.get('frozen'))} | {_gib(p.get('caches'))} | {_gib(p.get('temporaries'))} | "
            f"{_gib(r.total)} | {100 * r.total / r.usable:.0f}% | "
            f"{'yes' if r.fits else '**NO**'} | "
            f"{'-' if r.flops is None else f'{r.flops / 1e12:.2f}'} | "
            f"{'-' if r.hbm_bytes is None else f'{r.hbm_bytes / 1e9:.2f}'} | "
            f"{'-' if r.step_s is None else f'{r.step_s * 1e3:.1f}'} | "
            f"{'-' if r.mfu is None else f'{100 * r.mfu:.0f}%'} | "
            f"{'-' if r.roofline is None else f'{100 * r.roofline:.0f}%'} |")
    return head + "\n\n" + "\n".join(rows)


def advice(r: Result, config) -> str:
    """What to change when a program does not fit."""
    lines = [f"{r.program}: needs {_gib(r.total)} GiB of {r.usable / GiB:.2f} GiB per chip"
             + (f" ({r.error})" if r.error else "")]
    if r.largest:
        lines.append("  largest buffers:")
        lines += ["    " + b for b in r.largest]
    if r.kind == "train":
        tc = config.train
        lines.append(
            "  to fit: raise --config.train.grad_accum (micro-batch now "
            f"{tc.batch_size // max(tc.grad_accum, 1)} rows), set --config.model.remat=full "
            f"(now {config.model.remat}), a --config.train.loss_block of 256-1024 (now "
            f"{tc.loss_block}), a shorter --config.data.seq_len, or a larger slice "
            "(--topology) with the mesh's fsdp axis over all chips")
    else:
        lines.append("  to fit: lower the decode batch (--config.plan.decode_batches), the cache "
                     "(--config.plan.cache_len), use lazy experts, or a larger slice with a "
                     "larger tensor axis (--config.mesh.tensor)")
    return "\n".join(lines)


def run(config, slice_name: str, progress: bool = True) -> Tuple[List[Result], str]:
    chip, devices = topology_devices(slice_name)
    results = evaluate(config, chip, devices, progress)
    report = table(results, slice_name, chip)
    bad = [r for r in results if not r.fits]
    if bad:
        report += "\n\nDoes not fit (with {:.0%} headroom):\n".format(config.plan.headroom)
        report += "\n".join(advice(r, config) for r in bad)
    return results, report


def main(argv=None):
    from absl import flags


    def extra(fv):
        flags.DEFINE_string("topology", None, f"TPU slice, one of {', '.join(SLICES)} "
                            "(sets config.plan.topology); several, comma-separated, are "
                            "planned one after the other", flag_values=fv)
        flags.DEFINE_string("json", None, "also write the results as JSON here", flag_values=fv)

    argv = list(sys.argv[1:] if argv is None else argv)
    fv = parse_flags(["fr_jax.plan"] + argv, default_config_file("gemma2.py"), extra)
    config = fv.config
    names = [n.strip() for n in (fv.topology or config.plan.topology).split(",")]
    planned = []
    try:
        for slice_name in names:  # every name checked before anything is compiled
            check_slice(slice_name)
        for slice_name in names:
            results, report = run(config, slice_name)
            print(report if len(names) == 1 else f"## {slice_name}\n\n{report}\n", flush=True)
            planned.append({"slice": slice_name,
                            "results": [dataclasses.asdict(r) for r in results]})
    except PlanError as e:
        raise SystemExit(f"error: {e}") from None
    if fv.json:
        with open(fv.json, "w") as f:
            json.dump(planned[0] if len(planned) == 1 else {"slices": planned}, f, indent=1)
    return 0 if all(r["fits"] for p in planned for r in p["results"]) else 1


if __name__ == "__main__":
    sys.exit(main())
