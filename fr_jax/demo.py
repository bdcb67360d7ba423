"""`python -m fr_jax.demo`: the embedded multi-domain world end to end, on a CPU.

    python -m fr_jax.demo                                   # the full run, ~15 min on 2 cores
    python -m fr_jax.demo --config=configs/demo.py:quick    # from the bundled experts, ~6 min
    python -m fr_jax.demo --config=configs/demo.py:smoke    # every step, a few updates each
    python -m fr_jax.demo --config.train.workdir=/tmp/demo --config.train.seed=1

Builds the world's tasks, trains a shared base, three domain experts and a router (SFT, then
CDPO on sampled preference pairs) and the baselines, then prints and writes the table of
every decode mode per domain (<workdir>/results.{json,md,png}, TensorBoard under
<workdir>/tensorboard). Pipeline: fr_jax/toy/pipeline.py.
"""

from __future__ import annotations

from fr_jax import cli
from fr_jax.toy.pipeline import run_pipeline

COMMAND = cli.Command("demo", "demo.py", sections=("world", "demo"),
                      doc="docs/demo.md")


def main(argv=None):
    return cli.main(COMMAND, lambda config, fv: run_pipeline(config), argv)


if __name__ == "__main__":
    main()
