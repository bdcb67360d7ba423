"""The decoding KV cache: a pytree that `lax.scan` can carry.

Every row owns its write offset (`end`) and its next token position (`next_pos`), and every
slot records the position of the token it holds (`pos`, -1 when empty or padding). Masks
are derived from those positions, so rows may start at different offsets (left padding),
advance by different amounts (a lazily stepped expert catching up), and Gemma-2's sliding
window is measured in tokens, not slots.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from fr_jax.models.architecture import ModelConfig


@flax.struct.dataclass
class KVCache:
    """k, v: [batch, layers, kv_heads, slots, head_dim]; pos: [batch, slots] int32 (-1 empty);
    end: [batch] int32 next free slot; next_pos: [batch] int32 position of the next token.

    Slots are the second-minor dim of k and v: TPU tiles an array's two minor dims, and a
    [slots, head_dim] tile is dense where [kv_heads, head_dim] is mostly padding once tensor
    parallelism leaves one or two kv heads per chip (16x the bytes in bf16). Rows lead, as
    in every other per-row array, so writing each row's slots needs no transposed copy of
    the whole cache (`write_layer_slots`)."""

    k: jax.Array
    v: jax.Array
    pos: jax.Array
    end: jax.Array
    next_pos: jax.Array

    @property
    def max_len(self) -> int:
        return self.pos.shape[1]

    @property
    def batch_size(self) -> int:
        return self.pos.shape[0]


def init_cache(cfg: ModelConfig, batch_size: int, max_len: int, dtype=None) -> KVCache:
    """An empty cache of `max_len` slots per row, in `dtype` (default: the activation dtype)."""
    shape = (batch_size, cfg.num_layers, cfg.num_kv_heads, max_len, cfg.head_dim)
    dtype = jnp.dtype(dtype or cfg.dtype)
    return KVCache(
        k=jnp.zeros(shape, dtype),
        v=jnp.zeros(shape, dtype),
        pos=jnp.full((batch_size, max_len), -1, jnp.int32),
        end=jnp.zeros((batch_size,), jnp.int32),
        next_pos=jnp.zeros((batch_size,), jnp.int32),
    )


def write_slots(buf, new, start):
    """Writes new [B, T, ...] into buf [B, S, ...] at per-row slot offsets start [B]."""
    def one(row_buf, row_new, row_start):
        idx = (row_start,) + (0,) * (row_buf.ndim - 1)
        return jax.lax.dynamic_update_slice(row_buf, row_new, idx)
    return jax.vmap(one)(buf, new, start)


def write_layer_slots(stack, new, layer, start):
    """Writes one layer's new keys or values new [B, T, K, D] into the cache's stack
    [B, L, K, S, D] at layer `layer` (traced) and per-row slot offsets start [B].

    Only the T new slots of each row are written: in a loop carry XLA updates the stack in
    place, where scanning the layers' caches as inputs and outputs would allocate a second
    whole stack and copy every layer's cache into it on every call."""
    def one(row_stack, row_new, row_start):
        return jax.lax.dynamic_update_slice(row_stack, jnp.swapaxes(row_new, 0, 1)[None],
                                            (layer, 0, row_start, 0))
    return jax.vmap(one)(stack, new, start)


def chunk_positions(cache: KVCache, mask):
    """Token positions [B, T] for a chunk appended to `cache`; mask [B, T] marks real tokens
    (False = padding, position -1). Positions continue from each row's `next_pos`."""
    mask = mask.astype(jnp.int32)
    pos = cache.next_pos[:, None] + jnp.cumsum(mask, axis=1) - 1
    return jnp.where(mask > 0, pos, -1)


def advance(cache: KVCache, positions, n_valid=None) -> KVCache:
    """Records a chunk's positions [B, T] in the slot table and moves the row offsets on.
    (The per-layer keys and values are written by the attention layers themselves.)

    With `n_valid` [B] (a right-padded chunk: each row's real tokens first), a row's offset
    moves by its real tokens only, so the padding slots (position -1) are overwritten by
    the next chunk instead of using up the cache: a lazy expert catching up in fixed-width
    chunks then needs only one chunk's width of spare slots."""
    step = positions.shape[1] if n_valid is None else n_valid.astype(jnp.int32)
    return cache.replace(
        pos=write_slots(cache.pos, positions, cache.end),
        end=cache.end + step,
        next_pos=jnp.maximum(cache.next_pos, jnp.max(positions, axis=1) + 1),
    )


def rewind(cache: KVCache, drop) -> KVCache:
    """Forgets each row's last drop[b] written tokens (a speculative chunk's rejected
    positions): offsets move back, and their slots read as empty (position -1) until the
    next chunk overwrites them. Works on stacked caches too (leading expert axis): drop
    [B] broadcasts against end [..., B]."""
    drop = drop.astype(jnp.int32)
    end = cache.end - drop
    slot = jnp.arange(cache.pos.shape[-1], dtype=jnp.int32)
    gone = (slot >= end[..., None]) & (slot < cache.end[..., None])
    return cache.replace(pos=jnp.where(gone, -1, cache.pos), end=end,
                         next_pos=cache.next_pos - drop)
