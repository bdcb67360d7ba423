"""Base configuration (ml_collections). Files under `configs/` start from `base_config()`
and override fields; the CLI overrides any field with `--config.<path>=value`.
"""

from __future__ import annotations

import os
import runpy

import ml_collections

REPO_CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()

    c.model = ml_collections.ConfigDict()
    # Local HF folder; "" means the embedded tiny default (written on first use, no download).
    c.model.path = ""
    c.model.dtype = "float32"  # activations (and params unless param_dtype is set)
    c.model.param_dtype = ""  # "" = same as dtype

    c.decode = ml_collections.ConfigDict()
    c.decode.prompts = ("What is 12 plus 30?", "def add(a, b):")
    c.decode.chat = False  # apply the tokenizer's chat template to each prompt
    c.decode.max_new_tokens = 24
    c.decode.chunk = 8  # scan steps per jitted call; the host checks for EOS in between
    c.decode.cache_len = 0  # 0 = just enough for prompt + max_new_tokens
    return c


def default_config_file(name: str = "tiny.py") -> str:
    return os.path.join(REPO_CONFIGS, name)


def _fields(c, prefix=""):
    for k, v in c.items():
        if isinstance(v, ml_collections.ConfigDict):
            yield from _fields(v, prefix + k + ".")
        else:
            yield prefix + k


def _known_fields(config_file: str):
    try:
        return sorted(_fields(runpy.run_path(config_file)["get_config"]()))
    except Exception:  # the file itself is the problem; the absl message says why
        return []


def parse_flags(argv, config_file: str, define_extra=None):
    """Defines `--config` (an ml_collections config file, overridable field by field) plus
    the flags `define_extra(flag_values)` adds, parses argv (argv[0] is the program) and
    returns the absl FlagValues. Config mistakes become one clear message instead of a
    traceback: an unknown field lists the known ones, an ill-typed value names the type."""
    from absl import flags
    from ml_collections import config_flags

    flag_values = flags.FlagValues()
    try:
        config_flags.DEFINE_config_file("config", config_file, "ml_collections config file",
                                        flag_values=flag_values, lock_config=True,
                                        sys_argv=list(argv))
        if define_extra is not None:
            define_extra(flag_values)
        rest = flag_values(argv)
        list(flag_values.config.keys())  # the file loads lazily: make a bad path fail here
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError, OSError) as e:
        msg = str(e).strip("\"'")
        bad = [a for a in argv[1:] if a.startswith("--config")]
        files = [a.split("=", 1)[1] for a in argv[1:] if a.startswith("--config=")]
        known = _known_fields(files[-1] if files else config_file)
        if known:
            unknown = sorted({a[len("--config."):].split("=")[0] for a in bad
                              if a.startswith("--config.")} - set(known))
            if unknown:
                msg = f"unknown config field(s) {', '.join(unknown)}"
            msg += "\nknown fields: " + ", ".join(known)
        raise SystemExit(f"bad command line ({' '.join(bad) or ' '.join(argv[1:])}): "
                         f"{msg}") from None
    if len(rest) > 1:
        raise SystemExit(f"unexpected arguments: {rest[1:]} (flags are written --name=value)")
    return flag_values
