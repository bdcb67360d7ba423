"""`python -m fr_jax.train`: train the router (stage 1 SFT, stage 2 CDPO) or, with
--config.train.stages=lm, fine-tune one plain model (fr_jax/loop).

    python -m fr_jax.train                                   # the bundled toy world
    python -m fr_jax.train --config=configs/gemma2.py --config.train.sft.lr=1e-5
"""

from __future__ import annotations

from fr_jax import cli
from fr_jax.loop import train
from fr_jax.toy.world_data import bundled_world_data

COMMAND = cli.Command("train", "tiny.py",
                      sections=("train", "data", "router", "experts"), doc="docs/training.md")


def run_training(config, fv=None) -> str:
    """Fills in the bundled toy world where the config names no checkpoints -- a fresh
    router (from its pretrained base) for its experts, on the world's data -- then trains;
    returns the exported folder."""
    if "lm" not in config.train.stages and cli.use_bundled_world(config, router="router_base"):
        data = bundled_world_data()
        with config.unlocked():
            config.data.sft_path = config.data.sft_path or data["sft"]
            config.data.pref_path = config.data.pref_path or data["pref"]
    return train(config)


def main(argv=None):
    return cli.main(COMMAND, run_training, argv)


if __name__ == "__main__":
    main()
