"""Merge experts that share a base into one HF model (a baseline for FusionRoute).

    python -m fr_jax.merge [--config=configs/merge.py] [--method=ties] [--out=runs/merged]
        [--base=/ckpt/base --experts=/ckpt/a,/ckpt/b]

The output folder loads with transformers and with fr_jax; decode it with
`python -m fr_jax.decode --mode=merged --config.baselines.merged=<out>`.
"""

from __future__ import annotations

import sys


def run(c) -> str:
    from fr_jax.baselines.merge import merge_hf

    base, experts = c.base, list(c.experts)
    if not base and not experts:
        from fr_jax.toy.demo import bundled_world
        world = bundled_world()
        base, experts = world["base"], world["experts"]
    if not base or not experts:
        raise SystemExit("error: give both --base (the experts' shared base) and --experts "
                         "(comma-separated folders), or neither for the bundled toy world")
    options = {"linear": {"weights": list(c.weights) or None},
               "task_arithmetic": {"lambdas": list(c.lambdas) or c.lam},
               "ties": {"density": c.density, "lam": c.lam},
               "dare": {"drop": c.drop, "seed": c.seed, "lambdas": list(c.lambdas) or c.lam,
                        "combine": c.combine, "density": c.density, "lam": c.lam}}
    if c.method not in options:
        raise SystemExit(f"error: unknown merge method {c.method!r}; choose one of "
                         f"{', '.join(options)}")
    out = merge_hf(base, experts, c.out, c.method, dtype=c.dtype or None, **options[c.method])
    shown = ", ".join(f"{k}={v}" for k, v in options[c.method].items())
    print(f"merged {len(experts)} experts of {base} with {c.method} ({shown}) -> {out}")
    return out


def main(argv=None):
    from absl import flags

    from fr_jax.baselines.merge import MergeError
    from fr_jax.config import default_config_file, parse_flags
    from fr_jax.hf import CheckpointError
    from fr_jax.models import ConfigError

    def extra(fv):
        for name, help_ in (("method", "merge method (sets config.method)"),
                            ("out", "output folder (sets config.out)"),
                            ("base", "the experts' base folder (sets config.base)"),
                            ("experts", "comma-separated expert folders (sets config.experts)")):
            flags.DEFINE_string(name, None, help_, flag_values=fv)

    argv = list(sys.argv[1:] if argv is None else argv)
    fv = parse_flags(["fr_jax.merge"] + argv, default_config_file("merge.py"), extra)
    c = fv.config
    with c.unlocked():
        for name in ("method", "out", "base"):
            if fv[name].value is not None:
                setattr(c, name, fv[name].value)
        if fv["experts"].value is not None:
            c.experts = tuple(p for p in fv["experts"].value.split(",") if p)
    try:
        return run(c)
    except (MergeError, CheckpointError, ConfigError) as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
