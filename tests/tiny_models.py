"""Tiny random transformers models (PyTorch, built locally) used as the parity reference.

Sizes are chosen so every feature under test changes the logits: soft-caps small enough
to bite, a sliding window shorter than the test sequence, query_pre_attn_scalar !=
head_dim, and llama3 rope scaling whose thresholds fall inside the frequency band.
"""

import torch
from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM

VOCAB = 256


def llama_config(tied=False, rope_scaling=True, **kw):
    rope = {"rope_type": "default", "rope_theta": 10000.0}
    if rope_scaling:
        rope = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64}
    args = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                max_position_embeddings=1024, rms_norm_eps=1e-5, rope_parameters=rope,
                tie_word_embeddings=tied, bos_token_id=1, eos_token_id=[2, 3], pad_token_id=0)
    args.update(kw)
    return LlamaConfig(**args)


def gemma2_config(**kw):
    args = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                query_pre_attn_scalar=24, attn_logit_softcapping=5.0,
                final_logit_softcapping=3.0, sliding_window=8, max_position_embeddings=1024,
                rms_norm_eps=1e-6, hidden_activation="gelu_pytorch_tanh", bos_token_id=1,
                eos_token_id=2, pad_token_id=0)
    args.update(kw)
    return Gemma2Config(**args)


def build(config, seed=0, std=None):
    """A random fp32 eager-attention model.

    `std` re-draws every matrix from N(0, std) and every norm weight around its neutral
    value (1 for Llama's w, 0 for Gemma-2's 1 + w) so that logits are O(1-10): soft-caps
    bite and norm weights matter, instead of sitting at the near-zero HF init."""
    torch.manual_seed(seed)
    config._attn_implementation = "eager"
    cls = LlamaForCausalLM if config.model_type == "llama" else Gemma2ForCausalLM
    model = cls(config).eval().to(torch.float32)
    if std is not None:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name:
                    neutral = 0.0 if config.model_type == "gemma2" else 1.0
                    p.normal_(neutral, 0.2)
                else:
                    p.normal_(0.0, std)
    return model


def torch_logits(model, tokens):
    with torch.no_grad():
        return model(torch.as_tensor(tokens, dtype=torch.long)).logits.float().numpy()
