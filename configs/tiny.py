"""The embedded default: a tiny random router and two tiny random experts (no checkpoints).

    python -m fr_jax.decode --config=configs/tiny.py --mode=expert_only
"""

from fr_jax.config import base_config


def get_config():
    c = base_config()
    c.router.path = ""  # "" + no experts = the embedded tiny world under $FR_JAX_HOME
    c.experts.paths = ()
    c.decode.max_new_tokens = 24
    return c
