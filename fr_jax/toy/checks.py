"""The demo pipeline's settings (configs/demo.py), every one checked before any file is
written: a run that would fail after its world data, or an hour into training, on a
seed, a size or a learning rate fails at the start instead, with the field named
(`--config.<field>=<value> ...`). Ranges and words are the rows' (fr_jax.config: the base
config's and the demo's sections); what is checked here is what no row can say (a domain a
mixture names, a model shape RoPE can use, a mode the demo trains a model for)."""

from __future__ import annotations

import json
import os

from fr_jax.config import check_ranges
from fr_jax.harness import toy_world as W
from fr_jax.routing.modes import Mode
from fr_jax.runtime.errors import ConfigError, ModeError
from fr_jax.runtime.paths import check_output

SEED_MAX = 2 ** 32 - 1
# The stand-alone models the pipeline trains, by their eval.modes names.
BASELINE_MODES = ("merged:ta", "merged:ties", "finetuned")


def needs_baseline(mode: str) -> bool:
    """Whether an eval mode decodes a model only the demo's baselines step trains."""
    return mode in ("finetuned", "sequence") or mode.startswith("merged")


def _domains(cfg, field: str, domains):
    """A {domain: number} setting names only domains among `domains`."""
    node = cfg
    for part in field.split("."):
        node = node[part]
    for d in node.keys():
        if d not in domains:
            raise ConfigError(f"--config.{field}.{d}: unknown domain {d!r}; the world's are "
                              f"{', '.join(domains)}")


def start_world(cfg) -> str:
    """The absolute folder of `cfg.demo.start_from`, refused unless it holds a world drawn as
    this run's is (same world seed and training pools; at least as many held-out prompts)."""
    src = os.path.abspath(cfg.demo.start_from)
    world_file = os.path.join(src, "world.json")
    if not os.path.isfile(world_file):
        raise ConfigError(f"demo.start_from={cfg.demo.start_from!r} is not a bundled world (no "
                          "world.json); leave demo.start_from empty to train the experts")
    with open(world_file) as f:
        made = json.load(f)
    want = {"seed": cfg.world.seed, "n_train": cfg.world.n_train}
    diff = {k: (made.get(k), v) for k, v in want.items() if made.get(k) != v}
    if made.get("n_test", -1) < cfg.world.n_test:
        diff["n_test"] = (made.get("n_test"), cfg.world.n_test)
    if diff:
        said = ", ".join(f"{k}: {a} there, {b} here" for k, (a, b) in diff.items())
        raise ConfigError(
            f"the world in {src} was drawn with different settings ({said}); set "
            "world.seed / world.n_train to its values (world.n_test at most its), or leave "
            "demo.start_from empty")
    return src


def check_demo(cfg):
    """Raises ConfigError naming the first demo setting that cannot run."""
    for field in ("world.base_mix", "world.router_mix"):
        _domains(cfg, field, W.EVAL_DOMAINS + (W.GENERAL,))
    _domains(cfg, "demo.experts.steps_by_domain", W.DOMAINS)
    check_ranges(cfg)  # every row's range and words: the base config's and the demo's
    for field in ("train.seed", "world.seed"):
        section, key = field.split(".")
        value = cfg[section][key]
        if not 0 <= value <= SEED_MAX:  # JAX's and numpy's seeds overflow far above this
            raise ConfigError(f"--config.{field}={value} is out of range: a seed is an "
                              f"integer in [0, {SEED_MAX}]")
    for field in ("world.base_mix", "world.router_mix"):
        if not sum(cfg.world[field.split(".")[1]].values()) > 0:
            raise ConfigError(f"--config.{field} has no positive weight: give at least one "
                              "domain a weight above 0")
    if set(cfg.pairs.sources.keys()) != {"toy"}:
        raise ConfigError(f"--config.pairs.sources: the demo draws its pairs from its own "
                          f"world's training prompts (source toy), not "
                          f"{', '.join(sorted(set(cfg.pairs.sources.keys()) - {'toy'}))}")
    limit = cfg.pairs.sources.toy.limit
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
        raise ConfigError(f"--config.pairs.sources.toy.limit={limit!r}: the number of training "
                          "prompts sampled for pairs is an integer, 0 (all) or more")
    for m in ("expert_model", "router_model"):
        mc = cfg.demo[m]
        head_dim = mc.hidden_size // mc.num_heads  # as pipeline.model_config makes it
        if head_dim < 2 or head_dim % 2:  # RoPE turns pairs of a head's dimensions
            raise ConfigError(f"--config.demo.{m}: hidden_size // num_heads ({mc.hidden_size} "
                              f"// {mc.num_heads} = {head_dim}) must be even and at least 2")
        if mc.num_heads % mc.num_kv_heads:
            raise ConfigError(f"--config.demo.{m}: num_heads ({mc.num_heads}) must be a "
                              f"multiple of num_kv_heads ({mc.num_kv_heads})")
    for mode in cfg.eval.modes:
        if mode in BASELINE_MODES:
            continue
        try:
            standalone = Mode.parse(mode, len(W.DOMAINS)).standalone
        except ModeError as e:
            raise ConfigError(f"--config.eval.modes: {e}") from None
        if standalone:
            raise ConfigError(f"--config.eval.modes: the demo trains no model {mode!r}; its "
                              f"baselines are {', '.join(BASELINE_MODES)}")
    if not cfg.demo.baselines:  # refused before any work, not at the evaluation
        needs = [m for m in cfg.eval.modes if needs_baseline(m)]
        if needs or cfg.demo.bundle:
            said = "eval.modes has " + ", ".join(needs) if needs else "demo.bundle is set"
            raise ConfigError(f"demo.baselines=False trains no baseline model, but {said}; "
                              "drop those or leave demo.baselines=True")
    check_output(cfg.train.workdir, "--config.train.workdir", makes_folders=True,
                 kind="folder")
    if cfg.demo.bundle:  # emptied before it is written: it must not hold the run itself
        check_output(cfg.demo.bundle, "--config.demo.bundle", [cfg.train.workdir],
                     makes_folders=True, kind="folder")
    if cfg.demo.start_from:
        start_world(cfg)
