"""Fused causal attention for the cache-free forward on TPU: the splash-attention kernel.

XLA does not fuse QK^T, the softmax and PV into one kernel, so training at 2k-token rows
writes every layer's float32 scores [B, K, G, T, S] to HBM and reads them back, forward
and backward (the bulk of the SFT step's HBM traffic, `fr_jax.plan`). The Pallas kernel
(jax.experimental.pallas.ops.tpu.splash_attention) keeps a block of scores on chip and
skips the blocks the causal mask hides.

The kernel masks by index, fr_jax by token position (`layers.attention_mask`). The two
agree on rows laid out as the batcher writes them: every segment's positions run 0, 1, ...
with its index, and padding (position -1) gets segment 0, which no real token shares.
Padding queries then attend to earlier padding instead of to nothing; their outputs are
never read by a real token (no real query sees a padding key) and never enter a loss.

Shapes: B=batch, T=tokens, H=query heads, K=kv heads, G=H//K, D=head_dim.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

from fr_jax.runtime import sharding as sh

# The kernel's tiles: T must be a multiple of the smallest (a TPU lane count).
_BLOCKS = (512, 256, 128)


def block_size(t: int) -> int:
    """The kernel's query / key tile at t tokens (a multiple of 128)."""
    return next(x for x in _BLOCKS if t % x == 0)


def _platform() -> str:
    """The platform being traced for: the mesh's devices under `sharding.traced_on` (so an
    ahead-of-time compile for a TPU slice on a CPU host counts as TPU), else the default."""
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty and mesh.abstract_device is not None:
        return mesh.abstract_device.platform
    return jax.default_backend()


def use_splash(attention: str, seq_len: int) -> bool:
    """Whether a cache-free forward of `seq_len` tokens runs the kernel: only at a multiple
    of 128 tokens (the kernel's tiles), with attention="splash" (off TPU in the Pallas
    interpreter: slow, for tests) or "auto" when tracing for TPU; never with "xla"."""
    if seq_len % _BLOCKS[-1]:
        return False
    return attention == "splash" or (attention == "auto" and _platform() == "tpu")


def _kernel(t: int, groups: int, window: Optional[int], softcap: Optional[float],
            interpret: bool):
    """The MQA kernel of one kv head: q [G, T, D], k / v [T, D] -> [G, T, D]."""
    b = block_size(t)
    sizes = sk.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b,
                          block_kv_dkv=b, block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)
    # A query sees keys q - window + 1 .. q (layers.attention_mask: q - k < window).
    one = sm.CausalMask((t, t)) if window is None else sm.LocalMask((t, t), (window - 1, 0), 0)
    return sk.make_splash_mqa(sm.MultiHeadMask([one] * groups), head_shards=1,
                              q_seq_shards=1, block_sizes=sizes, attn_logits_soft_cap=softcap,
                              interpret=interpret)


def splash_attention(q, k, v, positions, segment_ids, sliding, scale: float,
                     softcap: Optional[float], window: Optional[int]):
    """q [B, T, H, D], k / v [B, T, K, D], positions [B, T] (-1 = padding), segment_ids
    [B, T] or None, sliding a (traced) bool -> [B, T, H, D], the causal attention of
    `layers.dot_product_attention` with the mask of `layers.attention_mask`.

    Under a mesh (`sharding.traced_on`) the kernel runs per shard (shard_map): rows over
    the batch axes, kv heads over the tensor axis, as the rules table places them."""
    b, t, h, d = q.shape
    kh = k.shape[2]
    g = h // kh
    interpret = _platform() != "tpu"
    seg = jnp.ones((b, t), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
    seg = jnp.where(positions >= 0, jnp.maximum(seg, 1), 0)
    # Scores are q.k * scale: scale the queries once, in float32.
    q = (q.astype(jnp.float32) * scale).astype(q.dtype)
    q = q.reshape(b, t, kh, g, d).transpose(0, 2, 3, 1, 4)  # [B, K, G, T, D]
    k, v = (x.transpose(0, 2, 1, 3) for x in (k, v))  # [B, K, T, D]

    def run(kernel):
        def per_row(q, k, v, s):  # [K, G, T, D], [K, T, D], [K, T, D], [T]
            ids = sk.SegmentIds(s, s)
            return jax.vmap(lambda q, k, v: kernel(q, k, v, segment_ids=ids))(q, k, v)

        body = lambda q, k, v, s: jax.vmap(per_row)(q, k, v, s)
        mesh = jax.sharding.get_abstract_mesh()
        if mesh.empty:
            return body(q, k, v, seg)
        spec = lambda logical, x: sh.spec_for(logical, x.shape, mesh)
        q_spec = spec(("batch", "kv_heads", None, None, None), q)
        kv_spec = spec(("batch", "kv_heads", None, None), k)
        return jax.shard_map(body, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec,
                                                        spec(("batch", None), seg)),
                             out_specs=q_spec, check_vma=False)(q, k, v, seg)

    causal = lambda: run(_kernel(t, g, None, softcap, interpret))
    if window is None or t <= window:  # the window hides nothing at this length
        out = causal()
    else:
        out = jax.lax.cond(sliding, lambda: run(_kernel(t, g, window, softcap, interpret)),
                           causal)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)
