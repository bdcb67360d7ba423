"""Next-token selection from (log-)probabilities: greedy, temperature, top-k, top-p.

`Sampling` is static (hashable) so each setting compiles once; the RNG key is explicit.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

NEG_INF = -jnp.inf


@dataclasses.dataclass(frozen=True)
class Sampling:
    """temperature 0 = greedy; top_k 0 = off; top_p 1.0 = off."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def filter_logits(logits, top_k: int = 0, top_p: float = 1.0):
    """Sets to -inf every entry of logits [B, V] outside the top-k and the top-p nucleus.

    The nucleus is the smallest set of most likely tokens whose probability reaches top_p;
    the most likely token always stays.
    """
    if top_k and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, NEG_INF, logits)
    if top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        # Keep a token if the mass strictly before it is still below top_p.
        before = jnp.cumsum(probs, axis=-1) - probs
        keep_sorted = before < top_p
        keep = jnp.zeros_like(keep_sorted).at[
            jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
        logits = jnp.where(keep, logits, NEG_INF)
    return logits


def sample(logits, key, sampling: Sampling):
    """logits [B, V] (any additive normalisation) -> token ids [B] int32."""
    if sampling.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = filter_logits(logits.astype(jnp.float32) / sampling.temperature,
                           sampling.top_k, sampling.top_p)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def filter_rows(logits, top_k, top_p):
    """filter_logits with a setting per row: top_k [B] int (0 = off), top_p [B] float (1 =
    off). One sort serves both cuts."""
    v = logits.shape[-1]
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    k = jnp.where((top_k > 0) & (top_k < v), top_k, v)
    kth = jnp.take_along_axis(sorted_logits, (k - 1)[:, None], axis=-1)
    logits = jnp.where(logits < kth, NEG_INF, logits)
    sorted_logits = jnp.where(sorted_logits < kth, NEG_INF, sorted_logits)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs
    keep_sorted = (before < top_p[:, None]) | (top_p[:, None] >= 1.0)
    keep = jnp.zeros_like(keep_sorted).at[
        jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
    return jnp.where(keep, logits, NEG_INF)


def sample_rows(logits, keys, temperature, top_k, top_p):
    """logits [B, V] -> token ids [B] int32, each row with its own setting and key: keys [B]
    (a row's draw does not depend on the other rows), temperature [B] (0 = greedy), top_k
    [B], top_p [B]. A row's token is the one `sample(logits[b:b+1], keys[b], Sampling(...))`
    draws."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    hot = temperature > 0
    v = logits.shape[-1]
    cuts = jnp.any(hot & (((top_k > 0) & (top_k < v)) | (top_p < 1.0)))

    def draw(_):
        scaled = logits.astype(jnp.float32) / jnp.where(hot, temperature, 1.0)[:, None]
        # the vocabulary-wide sort only when a hot row cuts (a server's greedy rows do not)
        scaled = jax.lax.cond(cuts, lambda x: filter_rows(x, top_k, top_p), lambda x: x, scaled)
        drawn = jax.vmap(lambda k, row: jax.random.categorical(k, row[None], axis=-1)[0])(
            keys, scaled).astype(jnp.int32)
        return jnp.where(hot, drawn, greedy)
    return jax.lax.cond(jnp.any(hot), draw, lambda _: greedy, None)
