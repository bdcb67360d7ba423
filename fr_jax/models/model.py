"""`Model`: the pure functional API over a Transformer and its KV cache.

    model = Model(cfg)
    params = model.init(jax.random.key(0))                      # plain pytree
    out = model.forward(params, tokens)                          # training / scoring
    cache = model.init_cache(batch, max_len)
    out, cache = model.prefill(params, tokens, cache, mask)      # left-padded prompts
    out, cache = model.step(params, token, cache)                # one token per row

Every method is a pure function of its arguments (jit- and scan-friendly); `Model` itself
only holds the static config.
"""

from __future__ import annotations


import flax.linen as nn
import jax
import jax.numpy as jnp

from fr_jax.models import cache as cache_lib
from fr_jax.models.architecture import ModelConfig
from fr_jax.models.transformer import Transformer, TransformerOutput
from fr_jax.runtime.errors import CacheOverflowError


class Model:
    def __init__(self, cfg: ModelConfig):
        self.cfg = cfg
        self.module = Transformer(cfg)

    def __repr__(self):
        return f"Model({self.cfg.model_type}, layers={self.cfg.num_layers}, E={self.cfg.hidden_size})"

    # -------------------------------------------------------------- params
    def init(self, rng) -> dict:
        """Random params (HF-style N(0, 0.02) init); a plain nested dict of arrays."""
        tokens = jnp.zeros((1, 1), jnp.int32)
        variables = self.module.init(rng, tokens, jnp.zeros((1, 1), jnp.int32))
        return nn.meta.unbox(variables["params"])

    def logical_axes(self) -> dict:
        """Params-shaped pytree of logical axis names (PartitionSpecs of names)."""
        tokens = jnp.zeros((1, 1), jnp.int32)
        abstract = jax.eval_shape(self.module.init, jax.random.key(0), tokens, tokens)
        return nn.get_partition_spec(abstract)["params"]

    def param_shapes(self) -> dict:
        tokens = jnp.zeros((1, 1), jnp.int32)
        abstract = jax.eval_shape(self.module.init, jax.random.key(0), tokens, tokens)
        return nn.meta.unbox(abstract["params"])

    # -------------------------------------------------------------- cache-free
    def forward(self, params, tokens, positions=None, segment_ids=None,
                collect_intermediates: bool = False, last_only: bool = False,
                with_logits: bool = True):
        """tokens [B,T] -> TransformerOutput (logits [B,T,V] fp32, hidden [B,T,E]).

        positions default to 0..T-1; pass them (and `segment_ids`) for packed sequences.
        With `collect_intermediates`, also returns the per-layer residual stream [L,B,T,E].
        With `last_only`, logits and hidden cover the last position only ([B,1,...]).
        Without `with_logits`, logits is None: training forms them a block of positions at
        a time from the hidden state (`logits`), so [B, T, V] never exists.
        """
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32),
                                         tokens.shape)
        if collect_intermediates:
            (out, _), state = self.module.apply({"params": params}, tokens, positions,
                                                segment_ids=segment_ids, last_only=last_only,
                                                mutable=["intermediates"])
            return out, state["intermediates"]["layers"]["residual"][0]
        out, _ = self.module.apply({"params": params}, tokens, positions,
                                   segment_ids=segment_ids, last_only=last_only,
                                   with_logits=with_logits)
        return out

    def logits(self, params, hidden):
        """Final hidden states [..., E] -> float32 logits [..., V] (the LM head, soft-cap)."""
        return self.module.apply({"params": params}, hidden, method=Transformer.logits)

    # -------------------------------------------------------------- cached
    def init_cache(self, batch_size: int, max_len: int, dtype=None) -> cache_lib.KVCache:
        return cache_lib.init_cache(self.cfg, batch_size, max_len, dtype)

    def extend(self, params, tokens, cache: cache_lib.KVCache, mask=None,
               last_only: bool = False):
        """Appends a chunk tokens [B,T] (mask [B,T]: real tokens, False = padding) to every
        row of the cache and returns (TransformerOutput over the chunk, new cache).

        Rows continue from their own offsets, so this is prefill on an empty cache, a
        multi-turn continuation, or a catch-up on tokens a model has not yet seen.
        With `last_only`, the output covers the chunk's last token only ([B, 1, ...]).
        """
        t = tokens.shape[1]
        check_capacity(cache, t)
        if mask is None:
            mask = jnp.ones(tokens.shape, bool)
        positions = cache_lib.chunk_positions(cache, mask)
        new_cache = cache_lib.advance(cache, positions)
        out, (k, v) = self.module.apply(
            {"params": params}, tokens, positions, kv=(cache.k, cache.v),
            slot_start=cache.end, k_pos=new_cache.pos, last_only=last_only)
        return out, new_cache.replace(k=k, v=v)

    def catch_up(self, params, tokens, n_valid, cache: cache_lib.KVCache):
        """A right-padded chunk tokens [B, W] of which each row's first n_valid[b] are real
        (0: the row is left as it is) -> (TransformerOutput of each row's last real token
        [B, 1, ...], cache). Unlike `extend`, a row's offset moves by its real tokens only:
        the cache needs W spare slots beyond the tokens it will hold, not W per call."""
        w = tokens.shape[1]
        check_capacity(cache, w)
        mask = jnp.arange(w)[None, :] < n_valid[:, None]
        positions = cache_lib.chunk_positions(cache, mask)
        new_cache = cache_lib.advance(cache, positions, n_valid)
        out, (k, v) = self.module.apply(
            {"params": params}, tokens, positions, kv=(cache.k, cache.v),
            slot_start=cache.end, k_pos=new_cache.pos,
            last_index=jnp.maximum(n_valid - 1, 0))
        return out, new_cache.replace(k=k, v=v)

    def prefill(self, params, tokens, cache: cache_lib.KVCache, mask=None,
                last_only: bool = False):
        """Left-padded prompts tokens [B,T] with mask [B,T] (1 = real) into `cache`.

        Returns (TransformerOutput [B,T,...], cache). The next-token logits of each row are
        `out.logits[:, -1]` (left padding puts every row's last real token at T-1).
        """
        return self.extend(params, tokens, cache, mask, last_only)

    def step(self, params, token, cache: cache_lib.KVCache):
        """One token per row, token [B] -> (TransformerOutput with T squeezed: logits [B,V],
        hidden [B,E]; new cache)."""
        out, cache = self.extend(params, token[:, None], cache)
        return TransformerOutput(out.logits[:, 0], out.hidden[:, 0]), cache


def check_capacity(cache: cache_lib.KVCache, new_tokens: int, extra: int = 0):
    """Raises CacheOverflowError when `new_tokens` (+ `extra` still to come) cannot fit.

    Exact when the cache offsets are concrete (host side); under tracing only the static
    part (chunk longer than the whole cache) can be checked, so callers that loop under jit
    check the total budget on the host first.
    """
    need = new_tokens + extra
    if need > cache.max_len:
        raise CacheOverflowError(
            f"{need} tokens do not fit in a cache of {cache.max_len} slots; create the cache "
            f"with a larger max_len (or truncate the prompt)")
    if not isinstance(cache.end, jax.core.Tracer):
        end = int(jnp.max(cache.end))
        if end + need > cache.max_len:
            raise CacheOverflowError(
                f"cache holds {end} of {cache.max_len} slots; {need} more tokens do not fit. "
                f"Create the cache with max_len >= {end + need}")
