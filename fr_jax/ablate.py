"""`python -m fr_jax.ablate`: the router-training ablation in the demo world (see
fr_jax/toy/ablation.py and configs/ablation.py)."""

from __future__ import annotations

from fr_jax import cli
from fr_jax.toy.ablation import run_ablation

COMMAND = cli.Command("ablate", "ablation.py")


def main(argv=None):
    return cli.main(COMMAND, lambda config, fv: run_ablation(config), argv)


if __name__ == "__main__":
    main()
