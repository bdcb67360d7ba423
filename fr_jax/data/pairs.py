"""`python -m fr_jax.data.pairs`: CDPO preference pairs from the stage-1 router's answers.

    python -m fr_jax.data.pairs                  # the bundled toy world (configs/tiny.py)
    python -m fr_jax.data.pairs --config=configs/gemma2.py \\
        --config.router.path=runs/gemma2/router_sft        # the stage-1 router's export

For each source in config.pairs.sources (training prompts in a benchmark's record format),
FusionRoute answers every prompt greedily and `pairs.samples` times sampled; the
benchmark's scorer judges each answer and fr_jax.datagen.preference picks the pairs. Writes
pairs.output (default data.pref_path, what stage `cdpo` trains on, else
<pairs.workdir>/pref.jsonl) as JSONL
{"prompt", "chosen", "rejected", "domain", "source", "id"} and <output stem>.stats.json,
and prints the statistics per domain. Every draw's answers and verdicts are cached under
pairs.workdir, so a killed run resumes batch by batch.
"""

from __future__ import annotations

import dataclasses
import os
from typing import List

from fr_jax import cli
from fr_jax.datagen import preference as PR
from fr_jax.harness import benchmarks as B
from fr_jax.harness.sandbox import Limits
from fr_jax.inference.lineup import lineup_from_config
from fr_jax.inference.sampling import Sampling
from fr_jax.runtime import distributed
from fr_jax.runtime.errors import ConfigError, DataError
from fr_jax.runtime.paths import check_output
from fr_jax.toy.world_data import bundled_world_data

COMMAND = cli.Command("data.pairs", "tiny.py", (
    cli.Flag("output", "pairs.output", "the pairs JSONL to write"),
    cli.Flag("samples", "pairs.samples", "sampled answers per prompt", "integer"),
    cli.Flag("workdir", "pairs.workdir", "answer and verdict caches (resume)"),
),
    sections=("pairs", "router", "experts"), doc="docs/real-models.md")


def read_sources(config, bundled: bool) -> List[PR.Source]:
    """config.pairs.sources -> Sources, every file read and checked before any model is."""
    p, e = config.pairs, config.eval
    if not p.sources:
        raise ConfigError("pairs.sources is empty: name at least one source of training "
                          "prompts (see configs/gemma2.py)")
    out = []
    for name, sc in p.sources.items():
        B.get_benchmark(sc.benchmark)
        if sc.benchmark not in e.max_new_tokens:
            raise ConfigError(f"pairs.sources.{name}: no max_new_tokens for benchmark "
                              f"{sc.benchmark!r}: set --config.eval.max_new_tokens."
                              f"{sc.benchmark}")
        path = sc.path
        if not path and not sc.hub:
            if not (sc.benchmark == "toy" and bundled):
                # A benchmark's default data is its *test* split: never train on it.
                raise ConfigError(
                    f"pairs.sources.{name}: no training prompts configured; set "
                    f"--config.pairs.sources.{name}.path=<file> (training records in "
                    f"{sc.benchmark}'s format: {', '.join(B.get_benchmark(sc.benchmark).fields)}"
                    f") or .hub=<owner/name:subset:split>")
            path = bundled_world_data()["pool"]
        elif path and not os.path.exists(path):
            # load_examples' own message names eval's field and the benchmark's test split.
            raise DataError(
                f"--config.pairs.sources.{name}.path={path!r} does not exist; point it at the "
                f"training prompts (records in {sc.benchmark}'s format: "
                f"{', '.join(B.get_benchmark(sc.benchmark).fields)}; JSONL, JSON, Parquet or a "
                "saved datasets folder)")
        examples = B.select(B.load_examples(sc.benchmark, path, sc.hub), sc.limit, p.seed)
        out.append(PR.Source(name, sc.benchmark, examples, sc.domain))
    return out


def settings(config) -> PR.PairSettings:
    p, e, d, sb = config.pairs, config.eval, config.decode, config.eval.sandbox
    return PR.PairSettings(
        max_new_tokens={k: int(v) for k, v in e.max_new_tokens.items()}, samples=p.samples,
        greedy=p.greedy, sampling=Sampling(p.temperature, 0, p.top_p), chosen=p.chosen,
        workdir=p.workdir, batch_size=p.batch_size, chunk=d.chunk, chat=config.data.chat,
        seed=p.seed, limits=Limits(timeout_s=sb.timeout_s, memory_mb=sb.memory_mb,
                                   max_output_bytes=sb.max_output_bytes, user=sb.user),
        workers=sb.workers, progress=e.progress)


def build(config, fv=None) -> dict:
    """The pairs and their statistics, written to pairs.output; returns the statistics."""
    output = (config.pairs.output or config.data.pref_path
              or os.path.join(config.pairs.workdir, "pref.jsonl"))
    bundled = cli.use_bundled_world(config)
    models = [config.router.path, *config.experts.paths]
    check_output(output, "pairs.output", models, makes_folders=True, kind="file")
    check_output(PR.stats_path(output), "pairs.output's statistics file", models,
                 makes_folders=True, kind="file")
    if config.pairs.workdir:
        check_output(config.pairs.workdir, "pairs.workdir", models, makes_folders=True,
                     kind="folder")
    sources = read_sources(config, bundled)  # data first: a bad file fails before loading
    lineup = lineup_from_config(config, [PR.MODE])
    ps = settings(config)
    rows, stats = PR.build_pairs(lineup, sources, ps)
    stats["settings"] = {k: v for k, v in dataclasses.asdict(ps).items() if k != "limits"}
    if distributed.is_main():  # every process decodes and scores; process 0 writes
        paths = PR.write_pairs(output, rows, stats)
        print("\n" + PR.table(stats), flush=True)
        print(f"wrote {len(rows)} pairs to {paths[0]} (statistics: {paths[1]})", flush=True)
    return stats


def main(argv=None):
    return cli.main(COMMAND, build, argv)


if __name__ == "__main__":
    main()
