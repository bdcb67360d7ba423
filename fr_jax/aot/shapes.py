"""The models a plan compiles: their shapes from the checkpoints' config.json when the
folders exist, else built-in presets of the public architectures; and the analytic FLOPs
the compiler's cost analysis cannot see (the fused attention kernel)."""

from __future__ import annotations

import os

from fr_jax.hf import load_config
from fr_jax.hf.hub import checkpoint_dir
from fr_jax.models import ModelConfig
from fr_jax.models.splash import block_size
from fr_jax.runtime.errors import PlanError


# ---------------------------------------------------------------------------- the models
def _llama(hidden, inter, layers, heads, kv, head_dim, tie, factor, theta=500000.0):
    return dict(model_type="llama", vocab_size=128256, hidden_size=hidden,
                intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
                num_key_value_heads=kv, head_dim=head_dim, tie_word_embeddings=tie,
                rms_norm_eps=1e-5, max_position_embeddings=131072, hidden_act="silu",
                rope_theta=theta, rope_scaling=dict(rope_type="llama3", factor=factor,
                                                    low_freq_factor=1.0, high_freq_factor=4.0,
                                                    original_max_position_embeddings=8192),
                bos_token_id=128000, eos_token_id=[128001, 128009])


def _gemma2(hidden, inter, layers, heads, kv, head_dim, qpas):
    return dict(model_type="gemma2", vocab_size=256000, hidden_size=hidden,
                intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
                num_key_value_heads=kv, head_dim=head_dim, query_pre_attn_scalar=qpas,
                attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                sliding_window=4096, rms_norm_eps=1e-6, max_position_embeddings=8192,
                hidden_activation="gelu_pytorch_tanh", rope_theta=10000.0,
                bos_token_id=2, eos_token_id=[1, 107], pad_token_id=0)


# The public architectures' config.json fields (as published with the checkpoints).
PRESETS = {
    "llama-3.2-1b": _llama(2048, 8192, 16, 32, 8, 64, True, 32.0),
    "llama-3.2-3b": _llama(3072, 8192, 28, 24, 8, 128, True, 32.0),
    "llama-3.1-8b": _llama(4096, 14336, 32, 32, 8, 128, False, 8.0),
    "llama-3.1-70b": _llama(8192, 28672, 80, 64, 8, 128, False, 8.0),
    "gemma-2-2b": _gemma2(2304, 9216, 26, 8, 4, 256, 256),
    "gemma-2-9b": _gemma2(3584, 14336, 42, 16, 8, 256, 256),
    "gemma-2-27b": _gemma2(4608, 36864, 46, 32, 16, 128, 144),
}


def model_config(path: str, arch: str, dtype: str, param_dtype: str, what: str):
    """ModelConfig of a checkpoint: its config.json if the folder (or hub model: only its
    config.json is fetched) has one, else preset `arch`."""
    path = checkpoint_dir(path, files=("config.json",))
    if path and os.path.isfile(os.path.join(path, "config.json")):
        return load_config(path, dtype, param_dtype)
    if arch not in PRESETS:
        where = f"{path!r} has no config.json" if path else "no checkpoint path is set"
        raise PlanError(f"{what}: {where}, and plan.{what}_arch={arch!r} names no preset; set "
                        f"--config.plan.{what}_arch to one of {', '.join(PRESETS)}")
    return ModelConfig.from_hf(PRESETS[arch], dtype=dtype, param_dtype=param_dtype,
                               source=f"preset {arch}")


def _layer_params(cfg) -> int:
    e, h, k, d, f = (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                     cfg.intermediate_size)
    return e * (h + 2 * k) * d + h * d * e + 3 * e * f


def forward_flops(cfg, tokens: int, context: float) -> float:
    """Model FLOPs of a forward pass over `tokens` tokens that each attend to `context` keys
    on average: 2 x (the layers' weight matmuls + the LM head) + 4 x heads x head_dim x
    context per layer (scores and the weighted sum)."""
    per_token = 2 * (cfg.num_layers * _layer_params(cfg) + cfg.hidden_size * cfg.vocab_size)
    per_token += 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim * context
    return per_token * tokens


def splash_flops(cfg, rows: int, seq: int, forwards: int, backward: bool) -> float:
    """FLOPs of the fused attention kernel (fr_jax.models.splash) in one program, which
    XLA's cost analysis cannot see inside (a Mosaic custom call): each of its T x T x D
    matmuls costs 2 T^2 D per head and layer over the causal tiles it visits; a forward
    runs 2 of them, a backward 7 (dq: 3, dk and dv: 4). 0 when the model runs einsums."""
    if cfg.attention not in ("auto", "splash") or seq % 128:
        return 0.0
    nb = seq // block_size(seq)
    visited = (nb + 1) / (2 * nb)  # tiles on or below the diagonal
    matmul = 2.0 * rows * seq * seq * visited * cfg.num_heads * cfg.head_dim * cfg.num_layers
    return matmul * (2 * forwards + 7 * backward)
