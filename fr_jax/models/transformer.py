"""The decoder-only transformer shared by Llama-3 and Gemma-2 (switches live in ModelConfig).

Layers are stacked with `nn.scan`: every per-layer parameter has a leading `layers` axis,
the whole stack compiles as one layer body (fast compiles at 8B scale). The KV cache of all
layers travels in the scan's carry, and each layer writes its new slots into it in place.
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fr_jax.models.architecture import ModelConfig
from fr_jax.models.layers import MLP, Attention, RMSNorm, dense_init
from fr_jax.runtime.sharding import constrain

# model.remat -> what the backward pass keeps of a layer's forward (the rest is recomputed).
REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,  # only the layer's input
    # the outputs of the weight matmuls; attention scores and elementwise work are redone
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
# The residual stream [B, T, E]: rows pinned over data/fsdp, the rest left to XLA.
RESIDUAL_AXES = ("batch", None, None)


class DecoderLayer(nn.Module):
    """One pre-norm block; Gemma-2 adds post-attention and post-MLP norms ("sandwich")."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, carry, per_layer, ctx):
        """carry = (x [B,T,E], the whole stack's (k, v) cache [B,L,K,S,D] or None);
        per_layer = (sliding flag, layer index); ctx is broadcast."""
        cfg = self.cfg
        x, kv = carry
        sliding, layer = per_layer
        norm = lambda name: RMSNorm(cfg.rms_norm_eps, cfg.norm_plus_one, cfg.dtype,
                                    cfg.param_dtype, name=name)
        h, new_kv = Attention(cfg, name="attn")(
            norm("pre_attn_norm")(x), ctx["positions"], sliding, kv=kv,
            slot_start=ctx.get("slot_start"), k_pos=ctx.get("k_pos"),
            segment_ids=ctx.get("segment_ids"), layer=layer)
        if cfg.sandwich_norms:
            h = norm("post_attn_norm")(h)
        x = x + h
        h = MLP(cfg, name="mlp")(norm("pre_mlp_norm")(x))
        if cfg.sandwich_norms:
            h = norm("post_mlp_norm")(h)
        x = constrain(x + h, RESIDUAL_AXES)
        # Per-layer residual stream, collected only when the caller asks for
        # mutable=["intermediates"] (prefill-activation probes of the baselines).
        self.sow("intermediates", "residual", x)
        return (x, new_kv), None


class TransformerOutput(NamedTuple):
    logits: jax.Array  # [B, T, V] float32 (after Gemma-2's final soft-cap); None if not asked
    hidden: jax.Array  # [B, T, E] final hidden state after the final norm


class Transformer(nn.Module):
    """tokens [B,T], positions [B,T] -> TransformerOutput, plus the updated KV cache stack.

    `kv` is a pair of stacked caches ([B,L,K,S,D] each) or None for a cache-free forward;
    with a cache, `slot_start` [B] is where the chunk is written and `k_pos` [B,S] the slot
    positions after writing it. `last_only` returns logits and hidden of the last token only;
    `last_index` [B] of token last_index[b] of each row (a right-padded chunk).
    """

    cfg: ModelConfig

    def setup(self):
        cfg = self.cfg
        self.embed = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=cfg.dtype,
                              param_dtype=cfg.param_dtype,
                              embedding_init=dense_init("vocab", "embed"))
        layer = DecoderLayer
        if cfg.remat != "none":
            layer = nn.remat(DecoderLayer, policy=REMAT_POLICIES[cfg.remat], prevent_cse=False)
        self.layers = nn.scan(
            layer,
            variable_axes={"params": 0, "intermediates": 0},
            split_rngs={"params": True},
            in_axes=(0, nn.broadcast),
            length=cfg.num_layers,
            unroll=cfg.num_layers if cfg.scan_unroll else 1,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )(cfg)
        self.final_norm = RMSNorm(cfg.rms_norm_eps, cfg.norm_plus_one, cfg.dtype,
                                  cfg.param_dtype)
        if not cfg.tie_word_embeddings:
            self.lm_head = self.param("lm_head", dense_init("embed", "vocab"),
                                      (cfg.hidden_size, cfg.vocab_size), cfg.param_dtype)

    def __call__(self, tokens, positions, kv=None, slot_start=None, k_pos=None,
                 segment_ids=None, last_only: bool = False, last_index=None,
                 with_logits: bool = True):
        cfg = self.cfg
        x = constrain(self.embed(tokens), RESIDUAL_AXES)
        if cfg.embed_scale is not None:
            # Gemma-2 rounds the normaliser to the activation dtype before multiplying.
            x = x * jnp.asarray(cfg.embed_scale, dtype=cfg.dtype)
        sliding = jnp.asarray(np.array([t == "sliding_attention" for t in cfg.layer_types]))
        ctx = {"positions": positions}
        if kv is not None:
            ctx.update(slot_start=slot_start, k_pos=k_pos)
        if segment_ids is not None:
            ctx["segment_ids"] = segment_ids
        (x, new_kv), _ = self.layers((x, kv), (sliding, jnp.arange(cfg.num_layers)), ctx)
        if last_only:
            # Prefill only needs the next-token logits: never build [B, T, V] for a long prompt.
            x = x[:, -1:]
        elif last_index is not None:
            x = jnp.take_along_axis(x, last_index[:, None, None].astype(jnp.int32), axis=1)
        hidden = self.final_norm(x)
        # without logits: the caller forms them block by block (fr_jax.steps.losses, blocked)
        logits = self.logits(hidden) if with_logits else None
        return TransformerOutput(logits, hidden), new_kv

    def logits(self, hidden):
        """hidden [..., E] -> float32 logits [..., V] (with the final soft-cap, if any and
        not left to the fusion rule: cfg.raw_logits)."""
        cfg = self.cfg
        w = self.embed.embedding.T if cfg.tie_word_embeddings else self.lm_head
        logits = jnp.einsum("...e,ev->...v", hidden.astype(cfg.dtype), w.astype(cfg.dtype),
                            preferred_element_type=jnp.float32)
        if cfg.final_logit_softcap is not None and not cfg.raw_logits:
            logits = jnp.tanh(logits / cfg.final_logit_softcap) * cfg.final_logit_softcap
        return logits
