"""`python -m fr_jax.eval`: decode modes x benchmarks -> the paper-style table.

    python -m fr_jax.eval --config=configs/llama3.py \\
        --benchmarks=gsm8k,math500,mbpp,humaneval,ifeval \\
        --modes=fusionroute,expert_only,sequence,merged,finetuned,expert:0,expert:1,expert:2
    python -m fr_jax.eval --config=configs/tiny.py --benchmarks=toy --config.eval.columns=groups
    python -m fr_jax.eval ... --limit=50          # a seeded subset of 50 per benchmark

Writes <eval.workdir>/results.{json,md,png} and resumes from its caches when re-run.
"""

from __future__ import annotations

from typing import List, Sequence

from fr_jax import cli
from fr_jax.config import CHOICES
from fr_jax.harness import benchmarks as B
from fr_jax.harness import runner as harness, report, scoring
from fr_jax.harness.sandbox import Limits, protections
from fr_jax.inference.lineup import lineup_from_config
from fr_jax.inference.sampling import Sampling
from fr_jax.runtime import distributed
from fr_jax.runtime.errors import ConfigError

COMMAND = cli.Command("eval", "tiny.py", (
    cli.Flag("benchmarks", "eval.benchmarks", "comma list of benchmarks", "list"),
    cli.Flag("modes", "eval.modes", "comma list of decode modes", "list"),
    cli.Flag("limit", "eval.limit", "examples per benchmark, a seeded subset", "integer"),
    cli.Flag("workdir", "eval.workdir", "caches and results"),
),
    sections=("eval", "router", "experts"), doc="docs/evaluation.md")


def evaluate(config, fv=None) -> dict:
    """config.eval.modes x config.eval.benchmarks -> the results dict (and its files)."""
    e, d = config.eval, config.decode
    benchmarks, modes = list(e.benchmarks), list(e.modes)
    if not benchmarks:
        raise ConfigError("no benchmarks given (--benchmarks=gsm8k,math500,...)")
    if not modes:
        raise ConfigError("no modes given (--modes=fusionroute,expert_only,...)")
    for b in benchmarks:
        B.get_benchmark(b)
        if b not in e.max_new_tokens:
            raise ConfigError(f"no max_new_tokens for {b}: set --config.eval.max_new_tokens.{b}")
    if e.columns not in CHOICES["eval.columns"]:
        raise ConfigError(f"eval.columns must be one of {CHOICES['eval.columns']}, got "
                          f"{e.columns!r}")
    # Data first: a missing file fails before any model is read.
    examples = {b: B.select(B.load_examples(b, e.data[b].path, e.data[b].hub), e.limit,
                            e.subset_seed) for b in benchmarks}
    cli.use_bundled_world(config)
    lineup = lineup_from_config(config, modes)
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
        if distributed.is_main():
            print(f"sandbox for generated code: {', '.join(active) or 'no kernel protections'}",
                  flush=True)
    results = harness.evaluate(lineup, examples, modes, settings)
    results.update(caption=caption(benchmarks, config), column_kind=(
        "benchmark" if e.columns == "benchmarks" else "group"),
        share_modes=[m for m in modes if m in ("fusionroute", "expert_only", "mixture",
                                                "sequence", "sequence:head")],
        metric_label="accuracy / pass@1 (%)", limit=e.limit, subset_seed=e.subset_seed)
    results["notes"] = notes(results)
    if distributed.is_main():  # every process evaluates; process 0 alone reports
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
    for mode, per in results.get("speculation", {}).items():
        k = next(iter(per.values()))["k"]
        cols = "; ".join(f"{c} {v['tokens_per_pass']:.2f} ({v['acceptance']:.0%} of drafts "
                         "kept)" for c, v in per.items())
        out.append(f"`{mode}`, speculative (k={k}), tokens per expert pass: {cols}.")
    return out


def main(argv=None):
    return cli.main(COMMAND, evaluate, argv)


if __name__ == "__main__":
    main()
