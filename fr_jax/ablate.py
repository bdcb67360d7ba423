"""`python -m fr_jax.ablate`: the router-training ablation in the demo world.

    python -m fr_jax.ablate                                   # every variant, seeds 0, 1, 2
    python -m fr_jax.ablate --config.variants="('router_lm', 'fused_all')" --config.seeds="(0, 1)"
    python -m fr_jax.ablate --config.common="('train.sft.steps=400',)"   # a change for every run

Trains the router of each variant (configs/ablation.py: each a change to configs/demo.py)
for each seed, and writes FusionRoute's accuracy per variant and domain, mean +- sd over
the seeds, to <workdir>/ablation.{json,md}. Runner: fr_jax/toy/ablation.py.
"""

from __future__ import annotations

from fr_jax import cli
from fr_jax.toy.ablation import run_ablation

COMMAND = cli.Command("ablate", "ablation.py", doc="docs/training.md")


def main(argv=None):
    return cli.main(COMMAND, lambda config, fv: run_ablation(config), argv)


if __name__ == "__main__":
    main()
