"""Checkpoints and tokenizers in and out: HF folders (config.json, safetensors, tokenizer)
read into fr_jax params and written back, each name resolved once into a `Checkpoint`
(folders.py); hub names resolved to local snapshots (hub.py)."""

from fr_jax.hf.folders import (Checkpoint, Named, hf_state_dict, load_config,  # noqa: F401
                               load_hf, load_tokenizer, local_folder, place, read_hf,
                               resolve, save_hf)
