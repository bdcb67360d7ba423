"""The bundled toy world (fr_jax/toy/assets/world, made by `python -m fr_jax.demo`): three
trained domain experts (math, code, instr) and their router; no checkpoints to download.

    python -m fr_jax.decode --config=configs/tiny.py --mode=expert_only
    python -m fr_jax.train --config=configs/tiny.py   # a new router for the bundled experts
"""

from fr_jax.config import base_config


def get_config():
    c = base_config()
    c.router.path = ""  # "" + no experts = the bundled toy world
    c.experts.paths = ()
    c.mesh.data, c.mesh.tensor = -1, 1  # tiny models: data parallel
    c.decode.prompts = ("add 37+8", "rev kqzt", "please caps mild", "twice rev kqzt",
                        "wrap rot mild")
    c.decode.max_new_tokens = 16

    c.data.seq_len = 64
    c.train.workdir = "runs/tiny"
    c.train.batch_size = 16
    c.train.log_every = 5
    c.train.eval_every = 20
    c.train.ckpt_every = 20
    c.train.sft.steps = 60
    c.train.sft.lr = 3e-3
    c.train.sft.warmup = 5
    c.train.sft.expert_signals = "precompute"
    c.train.cdpo.steps = 20
    c.train.cdpo.lr = 5e-4
    c.train.cdpo.warmup = 2
    c.train.cdpo.reference = "precompute"  # as the real-family configs run it
    return c
