"""Checkpoints and tokenizers in and out: HF folders (config.json, safetensors, tokenizer)
read into fr_jax params and written back (folders.py), hub names resolved to local
snapshots (hub.py)."""

from fr_jax.hf.folders import (hf_state_dict, load_config, load_hf, load_tokenizer,  # noqa: F401
                               place, read_hf, save_hf)
