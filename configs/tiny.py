"""The embedded default: a tiny random router and two tiny random experts (no checkpoints),
with toy SFT / preference data generated from the experts themselves.

    python -m fr_jax.decode --config=configs/tiny.py --mode=expert_only
    python -m fr_jax.train --config=configs/tiny.py
"""

from fr_jax.config import base_config


def get_config():
    c = base_config()
    c.router.path = ""  # "" + no experts = the embedded tiny world under $FR_JAX_HOME
    c.experts.paths = ()
    c.decode.max_new_tokens = 24

    c.data.seq_len = 64
    c.data.chat = False  # toy prompts carry their domain marker as plain text
    c.train.workdir = "runs/tiny"
    c.train.batch_size = 8
    c.train.log_every = 5
    c.train.eval_every = 20
    c.train.ckpt_every = 20
    c.train.sft.steps = 60
    c.train.sft.lr = 3e-3
    c.train.sft.warmup = 5
    c.train.cdpo.steps = 20
    c.train.cdpo.lr = 1e-3
    c.train.cdpo.warmup = 2
    return c
