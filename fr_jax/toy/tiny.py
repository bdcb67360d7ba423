"""A tiny random Llama-3-architecture checkpoint with a real (locally trained) tokenizer.

It is written as an ordinary HF folder (config.json + safetensors + tokenizer.json) so the
default run goes through exactly the same import, tokenizer and decode code as a real
checkpoint. The weights are random: the output is gibberish by design, the point is the
plumbing. (The trained multi-domain demo world replaces it as the default later.)
"""

from __future__ import annotations

import os

import jax

from fr_jax.hf import save_hf
from fr_jax.models import Model, ModelConfig, RopeConfig

BOS, EOS, PAD = "<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"
_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b\n",
    "What is 12 plus 30? The answer is 42.",
    "Write three bullet points about token-level routing of language models.",
    "FusionRoute picks an expert per token and adds the router's complementary logits.",
    "Experts: math, code, instructions. The router is small; the experts are large.",
]

# A plain-text chat format over the tokenizer's own special tokens.
_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}")


def default_home() -> str:
    """Where generated default artefacts live ($FR_JAX_HOME, else ~/.cache/fr_jax)."""
    return os.environ.get("FR_JAX_HOME", os.path.join(os.path.expanduser("~"), ".cache", "fr_jax"))


def build_tokenizer(vocab_size: int = 320):
    """A byte-level BPE tokenizer trained on a few embedded sentences (no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, BOS, EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS,
                                   pad_token=PAD)
    fast.chat_template = _CHAT_TEMPLATE
    return fast


def tiny_config(tokenizer) -> ModelConfig:
    return ModelConfig(
        model_type="llama", vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
        num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
        rope=RopeConfig(theta=500000.0, rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                        high_freq_factor=4.0, original_max_position_embeddings=256),
        tie_word_embeddings=True, max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id, eos_token_ids=(tokenizer.eos_token_id,),
        pad_token_id=tokenizer.pad_token_id)


def ensure_tiny_checkpoint(path: str | None = None, seed: int = 0) -> str:
    """Writes the tiny random checkpoint to `path` (once) and returns the folder."""
    path = path or os.path.join(default_home(), "tiny-random-llama")
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    tokenizer = build_tokenizer()
    cfg = tiny_config(tokenizer)
    params = Model(cfg).init(jax.random.key(seed))
    tmp = path + ".partial"
    save_hf(tmp, cfg, params, tokenizer=tokenizer)
    os.replace(tmp, path)  # a crash half-way never leaves a folder that looks complete
    return path
