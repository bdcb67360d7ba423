"""The demo pipeline's settings (configs/demo.py), every one checked before any file is
written: a run that would fail after its world data, or an hour into training, on a
seed, a size or a learning rate fails at the start instead, with the field named
(`--config.<field>=<value> ...`) as fr_jax.config.check_ranges names training's."""

from __future__ import annotations

import json
import os

from fr_jax.config import CHOICES, check_ranges
from fr_jax.harness import toy_world as W
from fr_jax.routing.modes import Mode
from fr_jax.runtime.errors import ConfigError, ModeError
from fr_jax.runtime.paths import check_output

_STAGE = (("steps", (1, None)), ("lr", ("(0", None)), ("warmup", (0, None)),
          ("batch_size", (1, None)))
_MODEL = ("hidden_size", "num_layers", "intermediate_size", "num_heads", "num_kv_heads")

RANGES = {
    "seed": (0, None), "world.seed": (0, None), "world.n_train": (1, None), "world.n_test": (1, None),
    "world.seq_len": (2, None),
    **{f"{m}.{k}": (1, None) for m in ("expert_model", "router_model") for k in _MODEL},
    **{f"{s}.{k}": r for s in ("base", "router_base", "experts", "sft", "cdpo")
       for k, r in _STAGE},
    "experts.own": (0, 1), "sft.lm_weight": (0, None), "sft.lm_mix": (0, 1),
    "cdpo.beta": ("(0", None), "cdpo.route_kl": (0, None), "cdpo.chosen_nll": (0, None),
    "cdpo.prompts": (1, None), "cdpo.samples": (0, None), "cdpo.temperature": (0, None),
    # The merge command's own limits (fr_jax.config.RANGES: lam, density).
    "merge.ta_lambda": (-10, 10), "merge.ties_density": ("(0", 1),
    "merge.ties_lambda": (-10, 10),
    "seqroute.n_labelled": (1, None), "eval.max_new_tokens": (1, None),
    "eval.batch_size": (1, None),
}
SEED_MAX = 2 ** 32 - 1
# The stand-alone models the pipeline trains, by their eval.modes names.
BASELINE_MODES = ("merged:ta", "merged:ties", "finetuned")


def _weights(cfg, field: str, domains) -> dict:
    """A {domain: number} setting's ranges; its domains must be among `domains`."""
    node = cfg
    for part in field.split("."):
        node = node[part]
    for d in node.keys():
        if d not in domains:
            raise ConfigError(f"--config.{field}.{d}: unknown domain {d!r}; the world's are "
                              f"{', '.join(domains)}")
    return {f"{field}.{d}": (0, None) for d in node.keys()}


def start_world(cfg) -> str:
    """The absolute folder of `cfg.start_from`, refused unless it holds a world drawn as
    this run's is (same world seed and training pools; at least as many held-out prompts)."""
    src = os.path.abspath(cfg.start_from)
    world_file = os.path.join(src, "world.json")
    if not os.path.isfile(world_file):
        raise ConfigError(f"start_from={cfg.start_from!r} is not a bundled world (no "
                          "world.json); leave start_from empty to train the experts")
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
            "start_from empty")
    return src


def check_demo(cfg):
    """Raises ConfigError naming the first demo setting that cannot run."""
    ranges = dict(RANGES)
    ranges.update(_weights(cfg, "base.mix", W.EVAL_DOMAINS + (W.GENERAL,)))
    ranges.update(_weights(cfg, "sft.mix", W.EVAL_DOMAINS + (W.GENERAL,)))
    steps = _weights(cfg, "experts.steps_by_domain", W.DOMAINS)
    ranges.update({k: (1, None) for k in steps})
    check_ranges(cfg, ranges)
    check_ranges(cfg)  # the sections shared with the product's config (seqroute, cdpo.chosen)
    for field in ("seed", "world.seed"):
        value = cfg.seed if field == "seed" else cfg.world.seed
        if value > SEED_MAX:  # JAX's and numpy's seeds overflow far above this
            raise ConfigError(f"--config.{field}={value} is out of range: a seed is an "
                              f"integer in [0, {SEED_MAX}]")
    for field in ("base.mix", "sft.mix"):
        if not sum(cfg[field.split(".")[0]].mix.values()) > 0:
            raise ConfigError(f"--config.{field} has no positive weight: give at least one "
                              "domain a weight above 0")
    for key in ("routing_loss", "lm_target", "lm_positions"):
        words = CHOICES[f"train.sft.{key}"]
        if cfg.sft[key] not in words:
            raise ConfigError(f"--config.sft.{key}={cfg.sft[key]!r} is not one of "
                              f"{', '.join(map(repr, words))}")
    for m in ("expert_model", "router_model"):
        mc = cfg[m]
        head_dim = mc.hidden_size // mc.num_heads  # as pipeline.model_config makes it
        if head_dim < 2 or head_dim % 2:  # RoPE turns pairs of a head's dimensions
            raise ConfigError(f"--config.{m}: hidden_size // num_heads ({mc.hidden_size} // "
                              f"{mc.num_heads} = {head_dim}) must be even and at least 2")
        if mc.num_heads % mc.num_kv_heads:
            raise ConfigError(f"--config.{m}: num_heads ({mc.num_heads}) must be a multiple "
                              f"of num_kv_heads ({mc.num_kv_heads})")
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
    check_output(cfg.workdir, "--config.workdir", makes_folders=True, kind="folder")
    if cfg.bundle:  # emptied before it is written: it must not hold the run itself
        check_output(cfg.bundle, "--config.bundle", [cfg.workdir], makes_folders=True,
                     kind="folder")
    if cfg.start_from:
        start_world(cfg)
