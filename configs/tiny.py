"""The embedded default: a tiny random Llama-3-architecture model, no checkpoints needed.

    python -m fr_jax.decode --config=configs/tiny.py --config.decode.max_new_tokens=8
"""

from fr_jax.config import base_config


def get_config():
    c = base_config()
    c.model.path = ""  # embedded tiny checkpoint under $FR_JAX_HOME (default ~/.cache/fr_jax)
    c.decode.max_new_tokens = 24
    return c
