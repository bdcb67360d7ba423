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

    # Router and experts: local HF folders. Both empty = the embedded tiny default world
    # (written on first use under $FR_JAX_HOME, no download).
    c.router = ml_collections.ConfigDict()
    c.router.path = ""  # a router saved by fr_jax, or a base checkpoint (fresh head)
    c.router.seed = 0  # seed of a fresh routing head (base checkpoint only)
    c.experts = ml_collections.ConfigDict()
    c.experts.paths = ()  # one folder per expert, in the router's order
    c.experts.names = ()  # display names; default: folder names
    c.experts.stacked = "auto"  # auto | yes | no (stack same-shape experts on an expert axis)

    c.model = ml_collections.ConfigDict()
    c.model.dtype = "float32"  # activations (and params unless param_dtype is set)
    c.model.param_dtype = ""  # "" = same as dtype

    c.mesh = ml_collections.ConfigDict()  # sizes of the mesh axes; one may be -1 (the rest)
    c.mesh.data = 1
    c.mesh.fsdp = 1
    c.mesh.tensor = -1
    c.mesh.expert = 1

    c.decode = ml_collections.ConfigDict()
    c.decode.mode = "fusionroute"  # fusionroute | expert_only | router_only | expert:<i> | mixture
    c.decode.prompts = ("What is 12 plus 30?", "def add(a, b):")
    c.decode.prompts_file = ""  # JSONL with a "prompt" field per line (overrides prompts)
    c.decode.chat = True  # apply the tokenizer's chat template to each prompt
    c.decode.max_new_tokens = 32
    c.decode.chunk = 8  # scan steps per jitted call; the host checks for EOS in between
    c.decode.cache_len = 0  # 0 = just enough for the longest prompt + max_new_tokens
    c.decode.truncate_prompt = False  # True: keep the last tokens of a prompt that is too long
    c.decode.eos_ids = ()  # () = the checkpoints' eos ids and the tokenizer's eos token
    c.decode.temperature = 0.0  # 0 = greedy (the paper's protocol)
    c.decode.top_k = 0
    c.decode.top_p = 1.0
    c.decode.seed = 0
    c.decode.output = ""  # JSONL path: one record per prompt (text, ids, per-token expert)
    c.decode.trace_html = ""  # HTML path: the coloured per-token routing trace
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
