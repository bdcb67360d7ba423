"""Decode throughput: one expert alone vs FusionRoute with E experts, fr_jax vs PyTorch.

    python benchmarks/decode_bench.py                       # CPU-sized models, with PyTorch
    python benchmarks/decode_bench.py --shape=llama3-8b --no_torch --batch=1,8   # on a GPU/TPU

Every configuration decodes the same random prompts for `--new_tokens` tokens (no EOS) with
random weights (speed does not depend on their values). fr_jax's compile time is reported
apart from the steady-state time; ms/token is wall time per decode step of the whole batch.
Models are written once as HF folders so fr_jax and the PyTorch reference read the same
safetensors (skipped with --no_torch at large shapes, where params are built in memory).
Prints a table with ratios measured in this one run and writes JSON (--out).
On a GPU it adds the memory-bandwidth roofline: bytes of weights + KV cache read per step
over the device's peak bandwidth, and the fraction of it achieved.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fr_jax.decode import Decoder, FusedDecoder  # noqa: E402
from fr_jax.experts import Experts, load_experts  # noqa: E402
from fr_jax.fusion import Mode  # noqa: E402
from fr_jax.hf import save_hf  # noqa: E402
from fr_jax.models import Model, ModelConfig, RopeConfig  # noqa: E402
from fr_jax.router import Router, load_router, save_router  # noqa: E402

# name -> (router shape, expert shape) as ModelConfig keyword arguments.
_LLAMA_ROPE = RopeConfig(theta=500000.0, rope_type="llama3", factor=32.0, low_freq_factor=1.0,
                         high_freq_factor=4.0, original_max_position_embeddings=8192)
SHAPES = {
    "cpu-small": (
        dict(vocab_size=4096, hidden_size=128, intermediate_size=384, num_layers=2,
             num_heads=4, num_kv_heads=2, head_dim=32),
        dict(vocab_size=4096, hidden_size=256, intermediate_size=768, num_layers=4,
             num_heads=8, num_kv_heads=4, head_dim=32)),
    "llama3-8b": (  # router: Llama-3.2-1B shape; experts: Llama-3-8B shape
        dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16,
             num_heads=32, num_kv_heads=8, head_dim=64, tie_word_embeddings=True,
             rope=_LLAMA_ROPE),
        dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
             num_heads=32, num_kv_heads=8, head_dim=128, rope=_LLAMA_ROPE)),
}
# Peak HBM bandwidth (bytes/s) by device kind, from the vendors' data sheets.
PEAK_BW = {"H100": 3.35e12, "H200": 4.8e12, "A100": 2.0e12, "L4": 0.3e12,
           "TPU v4": 1.2e12, "TPU v5 lite": 0.82e12, "TPU v5p": 2.76e12, "TPU v6 lite": 1.64e12}


def peak_bandwidth():
    kind = jax.devices()[0].device_kind
    for name, bw in PEAK_BW.items():
        if name.lower() in kind.lower():
            return kind, bw
    return kind, None


def tree_bytes(tree) -> int:
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))


@dataclasses.dataclass
class Row:
    impl: str
    config: str
    batch: int
    ms_per_token: float
    tokens_per_s: float
    compile_s: float = float("nan")
    bytes_per_step: int = 0
    roofline_ms: float = float("nan")
    roofline_fraction: float = float("nan")


def build(shape, n_experts, dtype, tmp, write):
    r_kw, e_kw = SHAPES[shape]
    base = dict(model_type="llama", dtype=dtype, param_dtype=dtype, eos_token_ids=(1,))
    r_cfg, e_cfg = ModelConfig(**base, **r_kw), ModelConfig(**base, **e_kw)
    keys = jax.random.split(jax.random.key(0), n_experts + 1)
    router = Router(r_cfg, n_experts)
    r_params = jax.jit(router.init)(keys[0])
    e_list = [jax.jit(Model(e_cfg).init)(k) for k in keys[1:]]
    if not write:
        experts = Experts([e_cfg] * n_experts)
        return router, r_params, experts, experts.combine(e_list), None, None
    r_path = os.path.join(tmp, "router")
    save_router(r_path, router, r_params)
    paths = []
    for i, p in enumerate(e_list):
        paths.append(os.path.join(tmp, f"expert{i}"))
        save_hf(paths[-1], e_cfg, p)
    del r_params, e_list
    router, r_params = load_router(r_path, dtype=dtype)
    experts, e_params = load_experts(paths, dtype=dtype)
    return router, r_params, experts, e_params, r_path, paths


def time_generate(fn, repeats):
    t0 = time.perf_counter()
    res = fn()
    first = time.perf_counter() - t0
    best = None
    for _ in range(repeats):
        res = fn()
        if best is None or res.seconds_decode < best.seconds_decode:
            best = res
    steady_total = best.seconds_prefill + best.seconds_decode
    return best, max(first - steady_total, 0.0)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="cpu-small", choices=sorted(SHAPES))
    ap.add_argument("--experts", default="2,3")
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--prompt_len", type=int, default=32)
    ap.add_argument("--new_tokens", type=int, default=33)
    ap.add_argument("--chunk", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 elsewhere")
    ap.add_argument("--no_torch", action="store_true", help="skip the PyTorch reference")
    ap.add_argument("--out", default="benchmarks/results/decode_bench.json")
    args = ap.parse_args(argv)
    platform = jax.devices()[0].platform
    dtype = args.dtype or ("float32" if platform == "cpu" else "bfloat16")
    batches = [int(b) for b in args.batch.split(",")]
    expert_counts = [int(e) for e in args.experts.split(",")]
    kind, peak = peak_bandwidth()
    steps = args.new_tokens - 1  # decode steps after the prefill's token
    rng = np.random.default_rng(0)
    rows = []

    for n_exp in expert_counts:
        with tempfile.TemporaryDirectory() as tmp:
            router, r_params, experts, e_params, r_path, paths = build(
                args.shape, n_exp, dtype, tmp, write=not args.no_torch)
            params = {"router": r_params, "experts": e_params}
            vocab = router.cfg.vocab_size
            cache_len = args.prompt_len + -(-steps // args.chunk) * args.chunk
            for b in batches:
                prompts = rng.integers(2, vocab, (b, args.prompt_len)).tolist()
                gen = dict(max_new_tokens=args.new_tokens, eos_ids=[])
                configs = [(f"fusionroute E={n_exp}", FusedDecoder(
                    Mode.parse("fusionroute"), router, experts, chunk=args.chunk), params)]
                if n_exp == expert_counts[0]:
                    one = jax.tree.map(lambda x: x[0], e_params) if experts.stacked else e_params[0]
                    configs.insert(0, ("expert alone", Decoder(experts.models[0],
                                                               chunk=args.chunk), one))
                for name, dec, p in configs:
                    res, compile_s = time_generate(
                        lambda: dec.generate(p, prompts, **gen), args.repeats)
                    ms = res.seconds_decode / res.steps * 1e3
                    weights = tree_bytes(p) if name == "expert alone" else tree_bytes(params)
                    n_models = 1 if name == "expert alone" else n_exp + 1
                    kv = (tree_bytes(jax.eval_shape(lambda: dec._init_caches(b, cache_len)))
                          if True else 0)
                    row = Row("fr_jax", name, b, ms, b * 1e3 / ms, compile_s, weights + kv)
                    if peak:
                        row.roofline_ms = row.bytes_per_step / peak * 1e3
                        row.roofline_fraction = row.roofline_ms / ms
                    rows.append(row)
                    print(f"  fr_jax {name:22s} B={b}: {ms:8.2f} ms/token "
                          f"(compile {compile_s:.1f} s, {n_models} models)", flush=True)
                if not args.no_torch:
                    import torch
                    from benchmarks.torch_reference import TorchFusedReference
                    torch.set_num_threads(os.cpu_count() or 1)
                    ref_cfgs = [(f"fusionroute E={n_exp}", "fusionroute")]
                    if n_exp == expert_counts[0]:
                        ref_cfgs.insert(0, ("expert alone", "expert:0"))
                    for name, mode in ref_cfgs:
                        ref = TorchFusedReference(r_path, paths, mode,
                                                  dtype=getattr(torch, dtype),
                                                  device="cuda" if platform == "gpu" else "cpu")
                        ref.generate(prompts, 3)  # warm-up
                        best = float("inf")
                        for _ in range(args.repeats):
                            t0 = time.perf_counter()
                            ref.generate(prompts, args.new_tokens)
                            best = min(best, time.perf_counter() - t0)
                        ms = best / args.new_tokens * 1e3  # includes prefill: flatters torch
                        rows.append(Row("pytorch", name, b, ms, b * 1e3 / ms))
                        print(f"  pytorch {name:21s} B={b}: {ms:8.2f} ms/token", flush=True)

    report(rows, args, kind, peak, dtype)


def report(rows, args, kind, peak, dtype):
    by = {(r.impl, r.config, r.batch): r for r in rows}
    print(f"\nDecode benchmark: shape {args.shape}, {dtype}, prompt {args.prompt_len}, "
          f"{args.new_tokens} new tokens, device {kind}"
          + (f" (peak {peak / 1e12:.2f} TB/s)" if peak else ""))
    head = f"{'impl':8s} {'config':22s} {'batch':>5s} {'ms/token':>9s} {'tok/s':>9s} " \
           f"{'compile s':>9s} {'vs 1 expert':>11s} {'fr_jax speedup':>14s}"
    if peak:
        head += f" {'roofline ms':>11s} {'achieved':>8s}"
    print(head)
    print("-" * len(head))
    for r in rows:
        alone = by.get((r.impl, "expert alone", r.batch))
        torch_row = by.get(("pytorch", r.config, r.batch))
        line = (f"{r.impl:8s} {r.config:22s} {r.batch:5d} {r.ms_per_token:9.2f} "
                f"{r.tokens_per_s:9.1f} {r.compile_s:9.1f} "
                f"{(r.ms_per_token / alone.ms_per_token if alone else float('nan')):10.2f}x "
                f"{(torch_row.ms_per_token / r.ms_per_token if torch_row and r.impl == 'fr_jax' else float('nan')):13.2f}x")
        if peak:
            line += f" {r.roofline_ms:11.3f} {r.roofline_fraction:8.1%}"
        print(line)
    print("vs 1 expert: ms/token relative to that implementation's single expert; "
          "fr_jax speedup: PyTorch ms/token / fr_jax ms/token.")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"shape": args.shape, "dtype": dtype, "device": kind, "peak_bw": peak,
                   "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
                   "rows": [dataclasses.asdict(r) for r in rows]}, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
