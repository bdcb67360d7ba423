"""Decode throughput: one expert alone vs FusionRoute with E experts, eager and lazy,
fr_jax vs PyTorch.

    python benchmarks/decode_bench.py                       # CPU-sized models, with PyTorch
    python benchmarks/decode_bench.py --shape=llama3-8b --no_torch --batch=1,8   # on a GPU/TPU

Eager FusionRoute steps the router and all E experts every token; lazy FusionRoute
(`lazy_experts`) steps the router and the selected expert, and an expert that was skipped
catches up when selected again. Lazy decoding is measured under routing patterns forced
with `route_schedule` (the router still runs): `sticky` (expert 0 throughout) and
`alternating` (experts 0, 1, ..., E-1 in turn, a new expert every token), and, with
`--toy`, under the real routing of the embedded world's trained router on its held-out
prompts. `router + 1 expert` (FusionRoute with one expert) is the floor lazy decoding
aims at.

Self-speculative FusionRoute (`--speculate`, k drafted tokens per expert pass; lazy experts,
sticky routing) is timed under forced acceptance: `accept-all` (the experts' final norm
zeroed: their logits are flat, so the fused argmax is the router's and every draft is
kept), `accept-none` (the router's LM head zeroed: it drafts token 0, which the fused rule
almost never picks) and `random` (random weights as they are); and, with `--toy`, on the
bundled world's held-out prompts per domain at batch 1 (answers end at their end id)
against lazy decoding, with the acceptance measured there. A speculative row's ms/token is
decode time over the tokens each row generated after the first.

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

from fr_jax.hf import save_hf  # noqa: E402
from fr_jax.inference import (Decoder, FusedDecoder, SpeculativeDecoder,  # noqa: E402
                              answer_slots)
from fr_jax.inference.speculative import acceptance  # noqa: E402
from fr_jax.models import Model, ModelConfig, RopeConfig  # noqa: E402
from fr_jax.routing.experts import Experts, load_experts  # noqa: E402
from fr_jax.routing.modes import Mode  # noqa: E402
from fr_jax.routing.router import Router, load_router, save_router  # noqa: E402

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
    "gemma2-9b": (  # router: Gemma-2-2B shape; experts: Gemma-2-9B shape
        dict(_gemma=True, vocab_size=256000, hidden_size=2304, intermediate_size=9216,
             num_layers=26, num_heads=8, num_kv_heads=4, head_dim=256,
             query_pre_attn_scalar=256.0),
        dict(_gemma=True, vocab_size=256000, hidden_size=3584, intermediate_size=14336,
             num_layers=42, num_heads=16, num_kv_heads=8, head_dim=256,
             query_pre_attn_scalar=256.0)),
}
_GEMMA2 = dict(model_type="gemma2", tie_word_embeddings=True, norm_plus_one=True,
               sandwich_norms=True, scale_embeddings=True, attn_logit_softcap=50.0,
               final_logit_softcap=30.0, sliding_window=4096, activation="gelu_tanh")
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
    note: str = ""


def model_config(kw: dict, dtype: str) -> ModelConfig:
    kw = dict(kw)
    base = dict(model_type="llama", dtype=dtype, param_dtype=dtype, eos_token_ids=(1,))
    if kw.pop("_gemma", False):
        base.update(_GEMMA2)
        n = kw["num_layers"]
        base["layer_types"] = tuple("sliding_attention" if i % 2 == 0 else "full_attention"
                                    for i in range(n))
    return ModelConfig(**base, **kw)


def build(shape, n_experts, dtype, tmp, write, stacked=True):
    r_kw, e_kw = SHAPES[shape]
    r_cfg, e_cfg = model_config(r_kw, dtype), model_config(e_kw, dtype)
    keys = jax.random.split(jax.random.key(0), n_experts + 1)
    router = Router(r_cfg, n_experts)
    r_params = jax.jit(router.init)(keys[0])
    e_list = [jax.jit(Model(e_cfg).init)(k) for k in keys[1:]]
    if not write:
        experts = Experts([e_cfg] * n_experts, stacked=stacked)
        return router, r_params, experts, experts.combine(e_list), None, None
    r_path = os.path.join(tmp, "router")
    save_router(r_path, router, r_params)
    paths = []
    for i, p in enumerate(e_list):
        paths.append(os.path.join(tmp, f"expert{i}"))
        save_hf(paths[-1], e_cfg, p)
    del r_params, e_list
    router, r_params = load_router(r_path, dtype=dtype)
    experts, e_params = load_experts(paths, dtype=dtype, stacked=stacked)
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


def _time_row(name, dec, p, prompts, gen, repeats, b, bytes_per_step, peak, extra=""):
    res, compile_s = time_generate(lambda: dec.generate(p, prompts, **gen), repeats)
    ms = res.seconds_decode / res.steps * 1e3
    row = Row("fr_jax", name, b, ms, b * 1e3 / ms, compile_s, bytes_per_step)
    if peak:
        row.roofline_ms = row.bytes_per_step / peak * 1e3
        row.roofline_fraction = row.roofline_ms / ms
    print(f"  fr_jax {name:30s} B={b}: {ms:8.2f} ms/token (compile {compile_s:.1f} s){extra}",
          flush=True)
    return row, res


def _kv_bytes(dec, b, cache_len):
    return tree_bytes(jax.eval_shape(lambda: dec._init_caches(b, cache_len)))


def schedules(patterns, n_exp):
    out = {"sticky": (0,), "alternating": tuple(range(n_exp))}
    return [(p, out[p]) for p in patterns]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="cpu-small", choices=sorted(SHAPES))
    ap.add_argument("--experts", default="2,3")
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--prompt_len", type=int, default=32)
    ap.add_argument("--new_tokens", type=int, default=33)
    ap.add_argument("--chunk", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--patterns", default="sticky,alternating",
                    help="forced routing patterns for lazy decoding ('' = none)")
    ap.add_argument("--catch_up_width", type=int, default=8)
    ap.add_argument("--toy", action=argparse.BooleanOptionalAction, default=None,
                    help="also time eager vs lazy with the embedded world's real routing "
                         "(default: on the CPU shape)")
    ap.add_argument("--layouts", default=None,
                    help="expert layouts for eager rows: stacked,list (default on CPU) or "
                         "list (default elsewhere: a second, stacked copy of 3 x 8B "
                         "weights would not fit next to the list)")
    ap.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 elsewhere")
    ap.add_argument("--speculate", default="2,4,8",
                    help="k of the self-speculative rows ('' = none)")
    ap.add_argument("--no_torch", action="store_true", help="skip the PyTorch reference")
    ap.add_argument("--out", default="benchmarks/results/decode_bench.json")
    args = ap.parse_args(argv)
    platform = jax.devices()[0].platform
    dtype = args.dtype or ("float32" if platform == "cpu" else "bfloat16")
    batches = [int(b) for b in args.batch.split(",")]
    expert_counts = [int(e) for e in args.experts.split(",")]
    patterns = [p for p in args.patterns.split(",") if p]
    ks = [int(k) for k in args.speculate.split(",") if k]
    layouts = (args.layouts or ("stacked,list" if platform == "cpu" else "list")).split(",")
    kind, peak = peak_bandwidth()
    steps = args.new_tokens - 1  # decode steps after the prefill's token
    rng = np.random.default_rng(0)
    rows = []
    w = args.catch_up_width

    for n_exp in expert_counts:
        with tempfile.TemporaryDirectory() as tmp:
            router, r_params, experts, e_params, r_path, paths = build(
                args.shape, n_exp, dtype, tmp, write=not args.no_torch,
                stacked="stacked" in layouts)
            params = {"router": r_params, "experts": e_params}
            vocab = router.cfg.vocab_size
            cache_len = args.prompt_len + -(-steps // args.chunk) * args.chunk
            # The list layout (one pytree per expert) for lazy decoding and the floor: a
            # step reads one expert's weights in place.
            e_list = (tuple(jax.tree.map(lambda x, i=i: x[i], e_params) for i in range(n_exp))
                      if experts.stacked else tuple(e_params))
            listed = Experts(experts.cfgs, stacked=False)
            router1 = Router(router.cfg, 1)
            floor_params = {"router": {"backbone": r_params["backbone"],
                                       "head": {"kernel": r_params["head"]["kernel"][:, :1]}},
                            "experts": e_list[:1]}
            floor_weights = tree_bytes(floor_params)
            for b in batches:
                prompts = rng.integers(2, vocab, (b, args.prompt_len)).tolist()
                gen = dict(max_new_tokens=args.new_tokens, eos_ids=[])
                configs = []
                if n_exp == expert_counts[0]:
                    alone = Decoder(experts.models[0], chunk=args.chunk)
                    configs.append(("expert alone", alone, e_list[0]))
                    configs.append(("router + 1 expert", FusedDecoder(
                        Mode.parse("fusionroute"), router1, Experts(experts.cfgs[:1],
                                                                     stacked=False),
                        chunk=args.chunk), floor_params))
                if experts.stacked:
                    configs.append((f"eager E={n_exp}", FusedDecoder(
                        Mode.parse("fusionroute"), router, experts, chunk=args.chunk), params))
                list_params = {"router": r_params, "experts": e_list}
                if "list" in layouts:
                    configs.append((f"eager E={n_exp} list", FusedDecoder(
                        Mode.parse("fusionroute"), router, listed, chunk=args.chunk),
                        list_params))
                for pattern, sched in schedules(patterns, n_exp):
                    configs.append((f"lazy E={n_exp} {pattern}", FusedDecoder(
                        Mode.parse("fusionroute"), router, listed, chunk=args.chunk,
                        lazy_experts=True, catch_up_width=w, route_schedule=sched),
                        list_params))
                for name, dec, p in configs:
                    if name.startswith("lazy"):  # a step reads the router and one expert
                        rc, ec, _, _ = jax.eval_shape(lambda: dec._init_caches(b, cache_len))
                        kv = tree_bytes(rc) + tree_bytes(ec[0])
                        weights = floor_weights
                    else:
                        kv = _kv_bytes(dec, b, cache_len)
                        weights = tree_bytes(p)
                    row, _ = _time_row(name, dec, p, prompts, gen, args.repeats, b,
                                       weights + kv, peak)
                    rows.append(row)
                if ks and n_exp == expert_counts[0]:
                    rows += spec_rows(args, ks, router, r_params, listed, e_list, prompts,
                                      gen, b)
                if not args.no_torch:
                    rows += torch_rows(args, n_exp, expert_counts, r_path, paths, prompts, b,
                                       dtype, platform)
    if args.toy if args.toy is not None else args.shape == "cpu-small":
        rows += toy_rows(args, batches, peak)
        if ks:
            rows += toy_spec_rows(args, ks)
    report(rows, args, kind, peak, dtype)


def torch_rows(args, n_exp, expert_counts, r_path, paths, prompts, b, dtype, platform):
    import torch
    from benchmarks.torch_reference import TorchFusedReference
    torch.set_num_threads(os.cpu_count() or 1)
    ref_cfgs = [(f"eager E={n_exp}", "fusionroute")]
    if n_exp == expert_counts[0]:
        ref_cfgs.insert(0, ("expert alone", "expert:0"))
    rows = []
    for name, mode in ref_cfgs:
        ref = TorchFusedReference(r_path, paths, mode, dtype=getattr(torch, dtype),
                                  device="cuda" if platform == "gpu" else "cpu")
        ref.generate(prompts, 3)  # warm-up
        best = float("inf")
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            ref.generate(prompts, args.new_tokens)
            best = min(best, time.perf_counter() - t0)
        ms = best / args.new_tokens * 1e3  # includes prefill: flatters torch
        rows.append(Row("pytorch", name, b, ms, b * 1e3 / ms))
        print(f"  pytorch {name:29s} B={b}: {ms:8.2f} ms/token", flush=True)
    return rows


def toy_lineup():
    """The bundled world's lineup, its experts as a list (Experts, params) as well."""
    from fr_jax.runtime.bundle import bundled_world
    from fr_jax.toy.pipeline import load_world_lineup as load_lineup

    world = bundled_world()
    lineup = load_lineup(world["router"], world["experts"], {})
    listed = Experts(lineup.experts.cfgs, vocab=lineup.experts.vocab, stacked=False)
    list_params = dict(lineup.params, experts=tuple(
        jax.tree.map(lambda x, i=i: x[i], lineup.params["experts"])
        for i in range(lineup.experts.n)))
    return lineup, listed, list_params


def toy_rows(args, batches, peak):
    """Eager vs lazy FusionRoute on the bundled world (3 experts) with its trained router's
    real routing, on its held-out mixed prompts (no EOS, so every step is timed)."""
    from fr_jax.corpus import encode_prompt
    from fr_jax.harness.benchmarks import default_toy_tasks

    lineup, listed, list_params = toy_lineup()
    # The held-out mixed prompts: a format applied to a computed value, where the router
    # hands the answer from one expert to another (the single-skill domains stay on one).
    tasks = [t for t in default_toy_tasks() if t.domain == "mixed"]
    order = np.random.default_rng(1).permutation(len(tasks))
    rows = []
    for b in batches:
        prompts = [encode_prompt(lineup.tokenizer, tasks[i].prompt, True) for i in order[:b]]
        gen = dict(max_new_tokens=args.new_tokens, eos_ids=[])
        for name, lazy, experts, p in (
                ("toy eager E=3", False, lineup.experts, lineup.params),
                ("toy eager E=3 list", False, listed, list_params),
                ("toy lazy E=3 real", True, listed, list_params)):
            dec = FusedDecoder(Mode.parse("fusionroute"), lineup.router, experts,
                               vocab=len(lineup.tokenizer), chunk=args.chunk,
                               lazy_experts=lazy, catch_up_width=args.catch_up_width)
            row, res = _time_row(name, dec, p, prompts, gen, args.repeats, b, 0, None)
            switches = np.mean(res.chosen[:, 1:] != res.chosen[:, :-1])
            row.note = f"expert switches at {switches:.0%} of steps"
            print(f"    {row.note}")
            rows.append(row)
    return rows


def _spec_row(name, dec, p, prompts, gen, repeats, b, k):
    res, compile_s = time_generate(lambda: dec.generate(p, prompts, **gen), repeats)
    ms = res.seconds_decode / (gen["max_new_tokens"] - 1) * 1e3
    acc = acceptance(res.spec_passes, res.spec_accepted, k)
    row = Row("fr_jax", name, b, ms, b * 1e3 / ms, compile_s,
              note=f"{acc['tokens_per_pass']:.2f} tokens per expert pass")
    print(f"  fr_jax {name:30s} B={b}: {ms:8.2f} ms/token (compile {compile_s:.1f} s), "
          f"{row.note}", flush=True)
    return row


def spec_rows(args, ks, router, r_params, listed, e_list, prompts, gen, b):
    """Speculative FusionRoute (lazy, sticky routing) at each k under forced acceptance."""
    zero = lambda tree: jax.tree.map(lambda x: x * 0, tree)
    flat_experts = tuple(dict(p, final_norm=zero(p["final_norm"])) for p in e_list)
    blind = dict(r_params, backbone=dict(r_params["backbone"],
                                         lm_head=zero(r_params["backbone"]["lm_head"])))
    lineups = {"accept-all": (r_params, flat_experts), "accept-none": (blind, tuple(e_list)),
               "random": (r_params, tuple(e_list))}
    rows = []
    for pattern, (rp, ep) in lineups.items():
        for k in ks:
            dec = SpeculativeDecoder(Mode.parse("fusionroute"), router, listed, k,
                                     chunk=args.chunk, lazy_experts=True,
                                     catch_up_width=args.catch_up_width, route_schedule=(0,))
            rows.append(_spec_row(f"spec E={listed.n} k={k} {pattern}", dec,
                                  {"router": rp, "experts": ep}, prompts, gen, args.repeats,
                                  b, k))
            del dec
            jax.clear_caches()  # a long run's executables would exhaust the JIT's mappings
    return rows


def toy_spec_rows(args, ks, per_domain: int = 8, new_tokens: int = 24):
    """The bundled world at batch 1, per domain: lazy FusionRoute against speculative at each
    k on `per_domain` held-out prompts (answers end at their end id), with the acceptance.
    ms/token: decode time over the answers' tokens after the first, for both."""
    from fr_jax.corpus import encode_prompt
    from fr_jax.harness import toy_world as W
    from fr_jax.harness.benchmarks import default_toy_tasks

    lineup, listed, params = toy_lineup()
    # decode.chunk's default for both: a short answer pays for the rest of its last chunk
    # in plain decoding (a speculative chunk stops once the row is done)
    kw = dict(vocab=len(lineup.tokenizer), chunk=8, lazy_experts=True,
              catch_up_width=args.catch_up_width)
    decoders = [("lazy", 0, FusedDecoder(Mode.parse("fusionroute"), lineup.router, listed,
                                         **kw))]
    decoders += [(f"spec k={k}", k, SpeculativeDecoder(Mode.parse("fusionroute"), lineup.router,
                                                       listed, k, **kw)) for k in ks]
    tasks = default_toy_tasks()
    by_domain = {d: [encode_prompt(lineup.tokenizer, t.prompt, True)
                     for t in tasks if t.domain == d][:per_domain] for d in W.EVAL_DOMAINS}
    # one prompt width and cache length for all: each decoder compiles once
    width = max(len(p) for ps in by_domain.values() for p in ps)
    cache_len = width + answer_slots(new_tokens, 8, max(ks))
    rows = []
    for domain, prompts in by_domain.items():
        for name, k, dec in decoders:
            seconds, tokens, passes, kept = 0.0, 0, 0, 0
            for prompt in prompts:
                res, _ = time_generate(lambda: dec.generate(
                    params, [prompt], new_tokens, lineup.eos_ids, lineup.pad_id, width=width,
                    cache_len=cache_len), args.repeats)
                seconds += res.seconds_decode
                tokens += int(res.lengths[0]) - 1  # after the prefill's token
                if k:
                    passes, kept = passes + int(res.spec_passes[0]), kept + int(res.spec_accepted[0])
            ms = seconds / max(tokens, 1) * 1e3
            row = Row("fr_jax", f"toy {domain} {name}", 1, ms, 1e3 / ms)
            if k:
                acc = acceptance(passes, kept, k)
                row.note = (f"{acc['tokens_per_pass']:.2f} tokens per expert pass, "
                            f"{acc['acceptance']:.0%} of drafts kept")
            print(f"  fr_jax {row.config:30s} B=1: {ms:8.2f} ms/token {row.note}", flush=True)
            rows.append(row)
    return rows


def _lazy_reference(by, r):
    """The lazy row a speculative row compares with (None for the other rows)."""
    words = r.config.split()
    if words[0] == "spec":  # spec E=n k=K pattern -> lazy E=n sticky
        return by.get((r.impl, f"lazy {words[1]} sticky", r.batch))
    if words[0] == "toy" and len(words) > 2 and words[2] == "spec":
        return by.get((r.impl, f"toy {words[1]} lazy", r.batch))
    return None


def report(rows, args, kind, peak, dtype):
    by = {(r.impl, r.config, r.batch): r for r in rows}

    def ratio(r, other):
        return r.ms_per_token / other.ms_per_token if other else float("nan")

    print(f"\nDecode benchmark: shape {args.shape}, {dtype}, prompt {args.prompt_len}, "
          f"{args.new_tokens} new tokens, catch-up width {args.catch_up_width}, device {kind}"
          + (f" (peak {peak / 1e12:.2f} TB/s)" if peak else ""))
    head = (f"{'impl':8s} {'config':26s} {'batch':>5s} {'ms/token':>9s} {'tok/s':>9s} "
            f"{'compile s':>9s} {'vs 1 expert':>11s} {'vs r+1':>7s} {'vs eager':>8s} "
            f"{'vs lazy':>7s} {'fr_jax speedup':>14s}")
    if peak:
        head += f" {'roofline ms':>11s} {'achieved':>8s}"
    print(head)
    print("-" * len(head))
    for r in rows:
        toy = r.config.startswith("toy")
        n_exp = r.config.split("E=")[1].split()[0] if "E=" in r.config else None
        eagers = [by.get((r.impl, ("toy " if toy else "") + f"eager E={n_exp}{lay}", r.batch))
                  for lay in ("", " list")]
        eagers = [e for e in eagers if e is not None]
        eager = min(eagers, key=lambda e: e.ms_per_token) if eagers else None
        alone = None if toy else by.get((r.impl, "expert alone", r.batch))
        floor = None if toy else by.get((r.impl, "router + 1 expert", r.batch))
        torch_row = by.get(("pytorch", r.config, r.batch))
        lazy = _lazy_reference(by, r)
        line = (f"{r.impl:8s} {r.config:26s} {r.batch:5d} {r.ms_per_token:9.2f} "
                f"{r.tokens_per_s:9.1f} {r.compile_s:9.1f} {ratio(r, alone):10.2f}x "
                f"{ratio(r, floor):6.2f}x {ratio(r, eager):7.2f}x {ratio(r, lazy):6.2f}x "
                f"{(torch_row.ms_per_token / r.ms_per_token if torch_row and r.impl == 'fr_jax' else float('nan')):13.2f}x")
        if peak:
            line += f" {r.roofline_ms:11.3f} {r.roofline_fraction:8.1%}"
        print(line + (f"  {r.note}" if r.note else ""))
    print("vs 1 expert / vs r+1 / vs eager / vs lazy: ms/token over that of the expert alone / "
          "the router with one expert / the faster layout of eager FusionRoute with as many "
          "experts / lazy FusionRoute (sticky; toy: the same domain) (same batch, same run); "
          "fr_jax speedup: PyTorch ms/token / fr_jax ms/token. 'list': experts as separate "
          "pytrees instead of stacked under vmap.")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"shape": args.shape, "dtype": dtype, "device": kind, "peak_bw": peak,
                   "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
                   "catch_up_width": args.catch_up_width,
                   "rows": [dataclasses.asdict(r) for r in rows]}, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
