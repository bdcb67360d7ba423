"""A config checked before any work: every number in its range, every word one the field
accepts -- the ranges and words of the rows of the base config (fr_jax.config.base) and of
the demo's sections (fr_jax.config.demo_sections), and of the merge command's config, which
is not built from them."""

from __future__ import annotations

import math

from fr_jax.config.base import sections
from fr_jax.config.demo_sections import demo_sections
from fr_jax.config.settings import choices, ranges
from fr_jax.runtime.errors import ConfigError

# ---------------------------------------------------------------------------- checks
# config field -> (lowest, highest) and -> the words it accepts: the base config's and the
# demo's, from their rows; the merge command's (configs/merge.py, a config of its own; a task
# vector scaled beyond +-10 is no longer a merge of the experts). A field a config does not
# have is not checked.
RANGES = {**ranges(sections()), **ranges(demo_sections()),
          "lam": (-10, 10), "lambdas": (-10, 10), "weights": (0, None), "density": ("(0", 1),
          "drop": (0, "1)")}
CHOICES = {**choices(sections()), **choices(demo_sections())}


def _bound(b):
    """(number, open) of one end of a RANGES entry."""
    if isinstance(b, str):
        return float(b.strip("()")), True
    return (None, False) if b is None else (float(b), False)


def check_ranges(config, ranges=None):
    """Raises ConfigError naming the first field of `config` (of those in `ranges`, default
    RANGES) that is not a finite number within its range."""
    for key, (lo, hi) in (RANGES if ranges is None else ranges).items():
        node = config
        for part in key.split("."):
            node = node.get(part) if hasattr(node, "get") else None
        if node is None or isinstance(node, str):
            continue
        (low, low_open), (high, high_open) = _bound(lo), _bound(hi)
        # A {name: number} field (world.base_mix) is checked entry by entry, named as one.
        values = ([(f"{key}.{k}", v) for k, v in node.items()] if hasattr(node, "items")
                  else [(key, v) for v in (node if isinstance(node, (list, tuple)) else [node])])
        for name, v in values:
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            ok = ok and (low is None or v > low or (v == low and not low_open))
            ok = ok and (high is None or v < high or (v == high and not high_open))
            if not ok:
                span = (("(" if low_open else "[") + ("-inf" if low is None else f"{low:g}")
                        + ", " + ("inf" if high is None else f"{high:g}")
                        + (")" if high_open or high is None else "]"))
                raise ConfigError(f"--config.{name}={v!r} is out of range: it must be a finite "
                                  f"number in {span}")
    if ranges is None:
        factor = config.get("train", {}).get("spike_factor", 0)
        if 0 < factor <= 1:  # RANGES has no "0 or above 1"
            raise ConfigError(f"--config.train.spike_factor={factor!r} would stop every run: "
                              "it must be 0 (never) or above 1")
        for key, words in CHOICES.items():
            node = config
            for part in key.split("."):
                node = node.get(part) if hasattr(node, "get") else None
            if node is not None and node not in words:
                raise ConfigError(f"--config.{key}={node!r} is not one of "
                                  f"{', '.join(map(repr, words))}")
