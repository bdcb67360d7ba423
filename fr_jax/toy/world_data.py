"""The bundled world's training files: what `python -m fr_jax.train`, `fr_jax.eval`,
`fr_jax.seqroute` and the tests train on by default, written once under fr_jax's home
by the demo pipeline's own steps."""

from __future__ import annotations

import os
import runpy
from typing import Dict

from fr_jax.config import default_config_file
from fr_jax.harness import toy_world as W
from fr_jax.runtime.bundle import bundled_world, default_home, generating
from fr_jax.toy.world_pairs import preference_pairs


def ensure_world_data(home: str, n_sft: int = 4000, n_pref_prompts: int = 400,
                      n_labelled: int = 1600, seed: int = 0) -> Dict[str, str]:
    """Training files for the bundled world, written once under `home`: SFT records over
    all four domains, CDPO pairs from the bundled router's own sampled FusionRoute answers
    (fr_jax.toy.world_pairs.preference_pairs), labelled prompts for the SharedTrunkNet baseline, and the
    training pool the pairs' prompts are drawn from (`python -m fr_jax.data.pairs`'s
    default source)."""
    folder = os.path.join(home, "toy-world-data")
    paths = {"sft": os.path.join(folder, "data", "router_sft.jsonl"),
             "pref": os.path.join(folder, "data", "pref.jsonl"),
             "labelled": os.path.join(folder, "data", "labelled.jsonl"),
             "pool": os.path.join(folder, "data", "train_pool.jsonl")}
    if all(os.path.isfile(p) for p in paths.values()):
        return paths
    with generating(folder):
        if all(os.path.isfile(p) for p in paths.values()):  # another process wrote them
            return paths
        cfg = runpy.run_path(default_config_file("demo.py"))["get_config"]("quick")
        cfg.train.seed, cfg.demo.progress = seed, False
        cfg.pairs.sources.toy.limit = n_pref_prompts
        data = W.make_world_data(cfg.world.n_train, cfg.world.n_test, seed)
        pool = [t for d in W.EVAL_DOMAINS for t in data.train[d]]
        W.write_jsonl(paths["pool"], [t.record() for t in pool])
        if not all(os.path.isfile(paths[k]) for k in ("sft", "labelled", "pref")):
            W.write_jsonl(paths["sft"], [t.record() for t in W.mixture(
                data.train, {d: 1.0 for d in W.EVAL_DOMAINS}, n_sft, seed + 30)])
            world = bundled_world()
            W.write_jsonl(paths["labelled"], W.labelled_records(pool, n_labelled, seed))
            preference_pairs(cfg, folder, world["router"], world["experts"], pool)
    return paths


def bundled_world_data() -> Dict[str, str]:
    """The bundled world's training files (sft, pref, labelled, pool), written once under
    $FR_JAX_HOME: what a command trains on when its config names no data."""
    return ensure_world_data(default_home())
