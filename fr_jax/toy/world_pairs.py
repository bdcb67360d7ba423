"""The demo world's lineup and its preference pairs: what the pipeline's CDPO stage trains
on, and what the bundled world's training files (fr_jax.toy.world_data) hold -- apart from
the pipeline, so that a command reading those files does not import the whole of it."""

from __future__ import annotations

import os
from typing import Dict, List

import numpy as np

from fr_jax.datagen.preference import PairSettings, Source, build_pairs, write_pairs
from fr_jax.harness import toy_world as W
from fr_jax.harness.benchmarks import toy_examples
from fr_jax.inference.lineup import load_lineup
from fr_jax.inference.sampling import Sampling

EXPERT_NAMES = W.DOMAINS


def load_world_lineup(router_path: str, expert_paths: List[str], extra: Dict[str, str] = None,
                      seqroute: str = ""):
    """The world's lineup (fr_jax.inference.lineup): router, experts, stand-alone models `extra`
    {name: folder} and the SharedTrunkNet folder `seqroute` (mode `sequence`) when given."""
    return load_lineup(router_path, expert_paths, names=EXPERT_NAMES, models=extra,
                       seqroute=seqroute, seqroute_encoder="router" if seqroute else "")


def preference_pairs(cfg, root: str, sft_router: str, experts: List[str],
                     pool: List[W.Task]) -> str:
    """CDPO pairs from FusionRoute's own answers (fr_jax.datagen.preference, the engine of
    `python -m fr_jax.data.pairs`, with the config's pairs.*): for `pairs.sources.toy.limit`
    sampled training prompts (0 = all), the greedy answer and `pairs.samples` sampled ones
    are scored by exact match; a prompt with an incorrect answer gives the pair (chosen: a
    correct answer, else the reference -- or always the reference with
    pairs.chosen=reference; rejected: the incorrect answer the policy produced most often).
    Answers are cached under root/pairs (resume)."""
    path = os.path.join(root, "data", "pref.jsonl")
    if os.path.isfile(path):
        return path
    lineup = load_world_lineup(sft_router, experts)
    p, seed = cfg.pairs, cfg.train.seed
    order = np.random.default_rng(seed + 40).permutation(len(pool))
    tasks = [pool[i] for i in order[:p.sources.toy.limit or len(pool)]]
    ps = PairSettings(max_new_tokens={"toy": cfg.eval.max_new_tokens.toy},
                      samples=p.samples, greedy=p.greedy,
                      sampling=Sampling(p.temperature, top_p=p.top_p), chosen=p.chosen,
                      workdir=os.path.join(root, "pairs"), batch_size=p.batch_size, seed=seed,
                      progress=False)
    rows, stats = build_pairs(lineup, [Source("toy", "toy", toy_examples(tasks))], ps)
    write_pairs(path, rows, stats)
    if cfg.demo.progress:
        print(f"[pairs] {len(rows)} preference pairs from {len(tasks)} prompts "
              f"({int(p.greedy) + p.samples} FusionRoute answers each)", flush=True)
    return path
