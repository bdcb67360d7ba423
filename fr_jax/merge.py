"""`python -m fr_jax.merge`: merge experts that share a base into one HF model (a baseline
for FusionRoute; fr_jax/baselines/merging.py).

    python -m fr_jax.merge [--config=configs/merge.py] [--method=ties] [--out=runs/merged]
        [--base=/ckpt/base --experts=/ckpt/a,/ckpt/b]

The output folder loads with transformers and with fr_jax; decode it with
`python -m fr_jax.decode --mode=merged --config.baselines.merged=<out>`.
"""

from __future__ import annotations

from fr_jax import cli
from fr_jax.baselines.merging import merge_hf
from fr_jax.runtime.bundle import bundled_world
from fr_jax.runtime.errors import MergeError

COMMAND = cli.Command("merge", "merge.py", (
    cli.Flag("method", "method", "merge method"),
    cli.Flag("out", "out", "output folder"),
    cli.Flag("base", "base", "the experts' base folder"),
    cli.Flag("experts", "experts", "comma-separated expert folders", "list"),
),
    doc="docs/baselines.md")


def merge(c, fv=None) -> str:
    """Merges config.experts over config.base with config.method (neither given: the
    bundled toy world's); returns the output folder."""
    base, experts = c.base, list(c.experts)
    if not base and not experts:
        world = bundled_world()
        base, experts = world["base"], world["experts"]
    if not base or not experts:
        raise MergeError("give both --base (the experts' shared base) and --experts "
                         "(comma-separated folders), or neither for the bundled toy world")
    options = {"linear": {"weights": list(c.weights) or None},
               "task_arithmetic": {"lambdas": list(c.lambdas) or c.lam},
               "ties": {"density": c.density, "lam": c.lam},
               "dare": {"drop": c.drop, "seed": c.seed, "lambdas": list(c.lambdas) or c.lam,
                        "combine": c.combine, "density": c.density, "lam": c.lam}}
    if c.method not in options:
        raise MergeError(f"unknown merge method {c.method!r}; choose one of "
                         f"{', '.join(options)}")
    out = merge_hf(base, experts, c.out, c.method, dtype=c.dtype or None, **options[c.method])
    shown = ", ".join(f"{k}={v}" for k, v in options[c.method].items())
    print(f"merged {len(experts)} experts of {base} with {c.method} ({shown}) -> {out}")
    return out


def main(argv=None):
    return cli.main(COMMAND, merge, argv)


if __name__ == "__main__":
    main()
