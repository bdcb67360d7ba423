"""A tiny random FusionRoute world (tests): a router and experts with a real tokenizer.

Everything is written as ordinary HF folders (config.json + safetensors + tokenizer.json,
plus the router's routing head), so tests go through exactly the same import, tokenizer and
decode code as real checkpoints. The weights are random: the text is gibberish by design.
The trained default world is the demo's (fr_jax/toy/pipeline.py, bundled in fr_jax/toy/assets).
"""

from __future__ import annotations

import os

import jax

from fr_jax.hf import save_hf
from fr_jax.models import Model, ModelConfig, RopeConfig
from fr_jax.routing.router import Router, save_router
from fr_jax.runtime.bundle import default_home, generating

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


def ensure_tiny_world(path: str | None = None, n_experts: int = 2, seed: int = 0) -> dict:
    """Writes (once) a tiny router and `n_experts` experts sharing one tokenizer.

    Returns {"router": folder, "experts": [folders]}.
    """
    path = path or os.path.join(default_home(), f"tiny-random-world-{n_experts}")
    world = {"router": os.path.join(path, "router"),
             "experts": [os.path.join(path, f"expert{i}") for i in range(n_experts)]}
    done = os.path.join(path, "DONE")
    if os.path.isfile(done):
        return world
    with generating(path):
        if not os.path.isfile(done):  # else another process wrote it while this one waited
            _write_tiny_world(world, n_experts, seed)
            with open(done, "w") as f:
                f.write("complete\n")
    return world


def _write_tiny_world(world: dict, n_experts: int, seed: int):
    tokenizer = build_tokenizer()
    expert_cfg = tiny_config(tokenizer).replace(num_layers=3, layer_types=(), hidden_size=96,
                                                intermediate_size=192)
    keys = jax.random.split(jax.random.key(seed), n_experts + 1)
    for i, folder in enumerate(world["experts"]):
        params = Model(expert_cfg).init(keys[i + 1])
        # Larger weights than the init scale give each expert a distinct, peaked distribution.
        params = jax.tree.map(lambda x: x * 4.0 if x.ndim > 1 else x, params)
        save_hf(folder, expert_cfg, params, tokenizer=tokenizer)
    router = Router(tiny_config(tokenizer), n_experts)
    r_params = router.init(keys[0])
    r_params["head"]["kernel"] = r_params["head"]["kernel"] * 200.0  # routing that switches
    save_router(world["router"], router, r_params, tokenizer=tokenizer,
                expert_names=[f"expert{i}" for i in range(n_experts)])
