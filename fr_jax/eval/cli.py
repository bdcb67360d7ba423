"""`python -m fr_jax.eval`: decode modes x benchmarks -> the paper-style table.

    python -m fr_jax.eval --config=configs/llama3.py \\
        --benchmarks=gsm8k,math500,mbpp,humaneval,ifeval \\
        --modes=fusionroute,expert_only,sequence,merged,finetuned,expert:0,expert:1,expert:2
    python -m fr_jax.eval --config=configs/tiny.py --benchmarks=toy --config.eval.columns=groups
    python -m fr_jax.eval ... --limit=50          # a seeded subset of 50 per benchmark

Writes <eval.workdir>/results.{json,md,png} and resumes from its caches when re-run.
"""

from __future__ import annotations

import sys
from typing import List, Sequence

from fr_jax.fusion import Mode, ModeError


def _split(value: str) -> List[str]:
    return [x.strip() for x in value.split(",") if x.strip()]


def _loading_mode(modes: Sequence[Mode]):
    """One mode whose load brings every model the modes share (router, experts, selector)."""
    kinds = {m.kind for m in modes}
    if "sequence" in kinds:
        return Mode("sequence")
    router = any(m.uses_router for m in modes)
    experts = any(m.uses_experts for m in modes)
    if router and experts:
        return Mode("fusionroute")
    if experts:
        return next(m for m in modes if m.uses_experts)
    return Mode("router_only") if router else None


def build_lineup(config, modes: Sequence[str]):
    """The Lineup the modes need, loaded once with fr_jax.decode's loaders and checks."""
    from fr_jax import sharding as sh
    from fr_jax.config import decode_mesh
    from fr_jax.decode import load_standalone, load_world
    from fr_jax.eval.modes import Lineup
    from fr_jax.models import Model
    from fr_jax.toy.demo import bundled_world

    n = len(config.experts.paths) or None
    parsed = [Mode.parse(m, n) for m in modes]
    mesh = sh.mesh_from_config(decode_mesh(config))
    shared = [m for m in parsed if m.kind != "model"]
    router = experts = selector = tok = None
    params, names, cfgs, sources = {}, [], [], []
    load = _loading_mode(shared)
    if load is not None:
        router, experts, params, tok, names, cfgs, selector = load_world(config, load, mesh)
        if config.router.path or config.experts.paths:
            sources = ([config.router.path] if router is not None else []) + list(
                config.experts.paths if experts is not None else [])
        else:
            world = bundled_world()
            sources = [world["router"]] + world["experts"]
    models = {}
    for m in parsed:
        if m.kind == "model":
            _, _, p, mtok, _, mcfgs, _ = load_standalone(config, m, mesh)
            models[m.name] = (Model(mcfgs[0]), p["model"])
            cfgs += mcfgs
            tok = tok or mtok
            sources.append(getattr(config.baselines, m.model) or bundled_world()[m.model])
    eos = set(config.decode.eos_ids) or set().union(*(c.eos_token_ids for c in cfgs))
    return Lineup(router, experts, params, tok, names, models, selector,
                  source={"folders": sources}, eos_ids=sorted(eos), mesh=mesh,
                  lazy_experts=config.decode.lazy_experts,
                  catch_up_width=config.decode.catch_up_width)


def run(config, benchmarks: Sequence[str], modes: Sequence[str]) -> dict:
    from fr_jax.eval import benchmarks as B
    from fr_jax.eval import harness, report, scoring
    from fr_jax.eval.sandbox import Limits, protections
    from fr_jax.sampling import Sampling

    e, d = config.eval, config.decode
    if not benchmarks:
        raise SystemExit("no benchmarks given (--benchmarks=gsm8k,math500,...)")
    if not modes:
        raise SystemExit("no modes given (--modes=fusionroute,expert_only,...)")
    for b in benchmarks:
        B.get_benchmark(b)
        if b not in e.max_new_tokens:
            raise SystemExit(f"no max_new_tokens for {b}: set --config.eval.max_new_tokens.{b}")
    if e.columns not in ("benchmarks", "groups"):
        raise SystemExit(f"eval.columns must be 'benchmarks' or 'groups', got {e.columns!r}")
    # Data first: a missing file fails before any model is read.
    examples = {b: B.select(B.load_examples(b, e.data[b].path, e.data[b].hub), e.limit,
                            e.subset_seed) for b in benchmarks}
    lineup = build_lineup(config, modes)
    sb = e.sandbox
    settings = harness.Settings(
        max_new_tokens={b: int(e.max_new_tokens[b]) for b in benchmarks}, workdir=e.workdir,
        batch_size=e.batch_size, chunk=d.chunk, chat=d.chat,
        sampling=Sampling(d.temperature, d.top_k, d.top_p), seed=d.seed,
        limits=Limits(timeout_s=sb.timeout_s, memory_mb=sb.memory_mb,
                      max_output_bytes=sb.max_output_bytes, user=sb.user),
        workers=sb.workers, progress=e.progress, columns=e.columns)
    if any(B.get_benchmark(b).scorer in scoring.EXECUTES_CODE for b in benchmarks):
        active = [k for k, v in protections().items() if v is True]
        print(f"sandbox for generated code: {', '.join(active) or 'no kernel protections'}",
              flush=True)
    results = harness.evaluate(lineup, examples, modes, settings)
    results.update(caption=caption(benchmarks, config), column_kind=(
        "benchmark" if e.columns == "benchmarks" else "group"),
        share_modes=[m for m in modes if m in ("fusionroute", "expert_only", "mixture",
                                                "sequence", "sequence:head")],
        metric_label="accuracy / pass@1 (%)", limit=e.limit, subset_seed=e.subset_seed)
    results["notes"] = notes(results)
    paths = report.write(results, e.workdir)
    print("\n" + report.markdown(results), flush=True)
    print(f"wrote {', '.join(paths.values())}", flush=True)
    return results


def caption(benchmarks: Sequence[str], config) -> str:
    how = {"gsm8k": "GSM8K / MATH-500: final answer equivalent by math-verify",
           "math500": "GSM8K / MATH-500: final answer equivalent by math-verify",
           "humaneval": "HumanEval / MBPP: pass@1, programs run in the sandbox",
           "mbpp": "HumanEval / MBPP: pass@1, programs run in the sandbox",
           "ifeval": "IFEval: prompt-level strict accuracy",
           "toy": "toy: exact match"}
    parts = list(dict.fromkeys(how[b] for b in benchmarks))
    sampling = "greedy" if config.decode.temperature == 0 else (
        f"temperature {config.decode.temperature}")
    return f"Accuracy (%), zero-shot, {sampling} decoding ({'; '.join(parts)})."


def notes(results: dict) -> List[str]:
    """Lines under the table: examples that could not be scored, and why."""
    out = []
    for mode, per in results["skipped"].items():
        for bench, sk in per.items():
            why = "; ".join(f"{k}: {v}" for k, v in sorted(sk["reasons"].items()))
            out.append(f"`{mode}` on {bench}: {sk['count']} example(s) left out of the score "
                       f"({why}).")
    return out


def main(argv=None):
    from absl import flags

    from fr_jax.config import default_config_file, parse_flags
    from fr_jax.data import DataError
    from fr_jax.hf import CheckpointError
    from fr_jax.models import CacheOverflowError, ConfigError

    def extra(fv):
        flags.DEFINE_string("benchmarks", None, "comma list (sets config.eval.benchmarks)",
                            flag_values=fv)
        flags.DEFINE_string("modes", None, "comma list of decode modes (sets "
                            "config.eval.modes)", flag_values=fv)
        flags.DEFINE_integer("limit", None, "examples per benchmark, a seeded subset "
                             "(sets config.eval.limit)", flag_values=fv)
        flags.DEFINE_string("workdir", None, "caches and results (sets config.eval.workdir)",
                            flag_values=fv)

    argv = list(sys.argv[1:] if argv is None else argv)
    fv = parse_flags(["fr_jax.eval"] + argv, default_config_file("tiny.py"), extra)
    config = fv.config
    with config.unlocked():
        if fv.benchmarks is not None:
            config.eval.benchmarks = tuple(_split(fv.benchmarks))
        if fv.modes is not None:
            config.eval.modes = tuple(_split(fv.modes))
        if fv.limit is not None:
            config.eval.limit = fv.limit
        if fv.workdir is not None:
            config.eval.workdir = fv.workdir
    try:
        return run(config, list(config.eval.benchmarks), list(config.eval.modes))
    except (CheckpointError, ConfigError, CacheOverflowError, ModeError, DataError,
            ValueError) as e:
        raise SystemExit(f"error: {e}") from None
