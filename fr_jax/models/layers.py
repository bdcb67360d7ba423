"""Building blocks shared by every family: RMSNorm, rotary embeddings, attention, gated MLP.

Shapes use B=batch, T=query tokens, S=key slots, H=query heads, K=kv heads,
G=H//K (queries per kv head), D=head_dim, E=hidden size, F=MLP size.
Every parameter carries logical axis names (see `fr_jax.runtime.sharding`) so a rules table
can map it onto a mesh without touching this file.
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fr_jax.models.architecture import ModelConfig, RopeConfig
from fr_jax.models.cache import write_layer_slots
from fr_jax.models.splash import splash_attention, use_splash
from fr_jax.runtime.sharding import constrain

# A finite "minus infinity": a fully masked row (a pad query) then gets a uniform, finite
# softmax instead of NaNs that would poison the rest of the batch through reductions.
MASK_VALUE = float(np.finfo(np.float32).min)

_INIT = nn.initializers.normal(stddev=0.02)


def dense_init(*axes):
    return nn.with_logical_partitioning(_INIT, axes)


class RMSNorm(nn.Module):
    """RMSNorm in float32; scales by w (Llama) or (1 + w) (Gemma-2, `plus_one`)."""

    eps: float
    plus_one: bool = False
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):  # [..., E] -> [..., E]
        init = nn.initializers.zeros if self.plus_one else nn.initializers.ones
        w = self.param("scale", nn.with_logical_partitioning(init, ("norm",)),
                       (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        if self.plus_one:
            # Gemma-2 multiplies in float32 and casts once at the end.
            return (y * (1.0 + w.astype(jnp.float32))).astype(self.dtype)
        # Llama casts the normalised activations first, then scales in the param dtype.
        return (w * y.astype(self.dtype)).astype(self.dtype)


def rope_inv_freq(rope: RopeConfig, head_dim: int) -> np.ndarray:
    """Inverse frequencies [D/2] (float32), with Llama-3 / linear scaling applied."""
    inv = 1.0 / (rope.theta ** (np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32)
                                / head_dim))
    inv = inv.astype(np.float32)
    if rope.rope_type == "linear":
        return (inv / rope.factor).astype(np.float32)
    if rope.rope_type == "llama3":
        old_ctx = rope.original_max_position_embeddings
        low_wavelen = old_ctx / rope.low_freq_factor
        high_wavelen = old_ctx / rope.high_freq_factor
        wavelen = 2 * np.pi / inv
        # Long wavelengths (low frequencies) are slowed by `factor`, short ones kept, and the
        # band between the two thresholds interpolated smoothly.
        scaled = np.where(wavelen > low_wavelen, inv / rope.factor, inv)
        smooth = (old_ctx / wavelen - rope.low_freq_factor) / (
            rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return np.where(medium, smoothed, scaled).astype(np.float32)
    return inv


def apply_rope(x, positions, inv_freq):
    """Rotates x [B, T, N, D] by positions [B, T] in HF's half-split layout.

    HF checkpoints store q/k projections permuted so that the rotation pairs dimension i
    with i + D/2 ("rotate_half"); using the same layout here lets weights load unpermuted.
    """
    angles = jnp.maximum(positions, 0).astype(jnp.float32)[..., None] * inv_freq  # [B, T, D/2]
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def attention_mask(q_pos, k_pos, sliding, window: Optional[int], q_seg=None, k_seg=None):
    """Boolean mask [B, T, S]: key visible to query.

    Built from token positions (never slot indices), so left padding, caches written at
    per-row offsets and Gemma-2's sliding window all follow from one rule. A position of
    -1 marks padding or an empty cache slot. `sliding` may be a traced bool (per layer).
    """
    q = q_pos[:, :, None]
    k = k_pos[:, None, :]
    mask = (k >= 0) & (k <= q)
    if window is not None:
        mask = mask & jnp.logical_or(jnp.logical_not(sliding), q - k < window)
    if q_seg is not None:
        mask = mask & (q_seg[:, :, None] == k_seg[:, None, :])
    return mask


def dot_product_attention(q, k, v, mask, scale: float, softcap: Optional[float],
                          q_block: int = 0, heads_major: bool = False):
    """Grouped-query attention. q [B,T,H,D], k/v [B,S,K,D] (or [B,K,S,D], the cache's
    layout, with `heads_major`), mask [B,T,S] -> [B,T,H,D].

    Scores, soft-cap and softmax are float32; the weighted sum runs in the input dtype.
    With 0 < q_block < T the queries are attended `q_block` at a time (a sequential map:
    scores [B, K, G, q_block, S] instead of [B, K, G, T, S]; every query row's softmax is
    the same computation either way). At batch 32, 1024 prompt tokens into a cache of 2048
    slots, the float32 scores of one layer are 32 x heads x 8 MiB.
    """
    b, t, h, d = q.shape
    if q_block and t > q_block:
        n = -(-t // q_block)
        pad = n * q_block - t
        blocks = lambda x: jnp.moveaxis(jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
                                        .reshape((b, n, q_block) + x.shape[2:]), 1, 0)
        out = jax.lax.map(lambda qm: dot_product_attention(qm[0], k, v, qm[1], scale, softcap,
                                                           heads_major=heads_major),
                          (blocks(q), blocks(mask)))
        return jnp.moveaxis(out, 0, 1).reshape(b, n * q_block, h, d)[:, :t]
    kv_heads = k.shape[1 if heads_major else 2]
    kv = "bksd" if heads_major else "bskd"
    q = q.reshape(b, t, kv_heads, h // kv_heads, d)
    if heads_major:
        # Queries go where the cache's heads or rows are (sharding.FALLBACKS), never the
        # other way round: the cache is the big operand.
        q = constrain(q, ("batch", None, "kv_heads", None, None))
    scores = jnp.einsum(f"btkgd,{kv}->bkgts", q, k, preferred_element_type=jnp.float32) * scale
    if softcap is not None:
        scores = jnp.tanh(scores / softcap) * softcap
    scores = jnp.where(mask[:, None, None, :, :], scores, MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum(f"bkgts,{kv}->btkgd", probs, v)
    return out.reshape(b, t, h, d)


def _activation(name: str):
    return {"silu": nn.silu,
            "gelu_tanh": lambda x: nn.gelu(x, approximate=True),
            "gelu": lambda x: nn.gelu(x, approximate=False)}[name]


class MLP(nn.Module):
    """Gated MLP: down(act(gate(x)) * up(x)). [B,T,E] -> [B,T,E]."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        dense = lambda feat, axes, name: nn.DenseGeneral(
            feat, use_bias=cfg.mlp_bias, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
            kernel_init=dense_init(*axes), name=name)
        gate = dense(cfg.intermediate_size, ("embed", "mlp"), "gate_proj")(x)
        up = dense(cfg.intermediate_size, ("embed", "mlp"), "up_proj")(x)
        return dense(cfg.hidden_size, ("mlp", "embed"), "down_proj")(
            _activation(cfg.activation)(gate) * up)


class Attention(nn.Module):
    """Self-attention with rotary positions, GQA, optional soft-cap and sliding window.

    With a cache (`kv` = the whole stack's (k [B,L,K,S,D], v [B,L,K,S,D]) and this layer's
    index `layer`) the new keys/values are written into layer `layer` at the per-row slot
    `slot_start` [B] and the queries attend over every slot of that layer, masked by the
    slot positions `k_pos` [B,S]; the updated stack is returned. Without a cache the T
    tokens attend to themselves.
    """

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, positions, sliding, kv=None, slot_start=None, k_pos=None,
                 segment_ids=None, layer=None):
        cfg = self.cfg
        proj = lambda heads, name: nn.DenseGeneral(
            (heads, cfg.head_dim), use_bias=cfg.attention_bias, dtype=cfg.dtype,
            param_dtype=cfg.param_dtype,
            kernel_init=dense_init("embed", "heads" if heads == cfg.num_heads else "kv_heads",
                                   "head_dim"), name=name)
        inv_freq = rope_inv_freq(cfg.rope, cfg.head_dim)
        q = apply_rope(proj(cfg.num_heads, "q_proj")(x), positions, inv_freq)
        k = apply_rope(proj(cfg.num_kv_heads, "k_proj")(x), positions, inv_freq)
        v = proj(cfg.num_kv_heads, "v_proj")(x)

        if kv is None:
            keys, values, k_pos, k_seg = k, v, positions, segment_ids
            new_kv = None
        else:
            new_kv = tuple(write_layer_slots(buf, new.astype(buf.dtype), layer, slot_start)
                           for buf, new in zip(kv, (k, v)))
            keys, values = (jax.lax.dynamic_index_in_dim(buf, layer, 1, keepdims=False)
                            for buf in new_kv)
            k_seg = None
            if segment_ids is not None:
                raise ValueError("segment_ids (packed sequences) are only supported without a cache")
        if kv is None and use_splash(cfg.attention, x.shape[1]):
            out = splash_attention(q, keys, values, positions, segment_ids, sliding,
                                   cfg.query_scale, cfg.attn_logit_softcap, cfg.sliding_window)
        else:
            mask = attention_mask(positions, k_pos, sliding, cfg.sliding_window, segment_ids,
                                  k_seg)
            out = dot_product_attention(q, keys.astype(cfg.dtype), values.astype(cfg.dtype),
                                        mask, cfg.query_scale, cfg.attn_logit_softcap,
                                        q_block=cfg.attn_block, heads_major=kv is not None)
        out = nn.DenseGeneral(cfg.hidden_size, axis=(-2, -1), use_bias=cfg.attention_bias,
                              dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                              kernel_init=dense_init("heads", "head_dim", "embed"),
                              name="o_proj")(out)
        return out, new_kv
