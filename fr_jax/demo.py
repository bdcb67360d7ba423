"""`python -m fr_jax.demo`: the embedded multi-domain world end to end (see
fr_jax/toy/pipeline.py and configs/demo.py)."""

from __future__ import annotations

from fr_jax import cli
from fr_jax.toy.pipeline import run_pipeline

COMMAND = cli.Command("demo", "demo.py")


def main(argv=None):
    return cli.main(COMMAND, lambda config, fv: run_pipeline(config), argv)


if __name__ == "__main__":
    main()
