"""Lazy experts: per decode step only the router and the selected expert run.

Every expert reads the prompt. Afterwards an expert that no row selected is skipped (a
`lax.cond`), so it falls behind; when it is selected again it first reads the tokens it
missed -- full chunks of `width` tokens in a `while_loop`, then one last chunk whose width
is the smallest of `catch_up_widths(width)` that holds the rest (a `lax.switch`) -- and
then gives the logits of the current position. The tokens are those of the eager
schedule, where every expert runs every step: caches are position-addressed
(fr_jax/models/cache.py), so reading a token late writes the same keys and values.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp


class StepState(NamedTuple):
    """FusedDecoder's carry besides the KV caches. t [B]: tokens fed since each row's prompt
    (per row: a serving slot starts a new prompt while the others go on). With lazy experts,
    hist [B, H]: those tokens; synced [n, B]: how many of them each expert's cache holds (an
    expert not selected falls behind until it is selected again)."""

    t: jax.Array
    hist: Optional[jax.Array] = None
    synced: Optional[jax.Array] = None


def catch_up_widths(width: int) -> Tuple[int, ...]:
    """The chunk widths a lazy expert's last catch-up chunk may take: powers of two below
    `width`, then `width`, so a one-token step (sticky routing) costs one token."""
    out, w = [], 1
    while w < width:
        out.append(w)
        w *= 2
    return tuple(out) + (width,)


def _write_at(hist, values, t):
    """hist [B, H] with hist[b, t[b]] = values[b] (t clipped to the last column: a slot that
    runs on past its budget only overwrites its own last entry)."""
    def one(row, v, i):
        return jax.lax.dynamic_update_slice(row, v[None], (i,))
    return jax.vmap(one)(hist, values, t)


class LazyExperts:
    """The lazy schedule over `experts` (an `Experts` group): caches, the prompt, one step,
    and the final catch-up. Pure functions of params and caches, traced inside the
    decoder's jitted prefill and scan."""

    def __init__(self, experts, vocab: int, width: int):
        if width < 1:
            raise ValueError(f"catch_up_width must be >= 1, got {width}")
        self.experts, self.vocab = experts, vocab
        self.width = width
        self.widths = catch_up_widths(width)

    def init_caches(self, batch: int, cache_len: int):
        """(one cache per expert, with a chunk's width of spare slots; hist [B, cache_len];
        synced [n, B])."""
        n = self.experts.n
        caches = tuple(self.experts.model(e).init_cache(batch, cache_len + self.width)
                       for e in range(n))
        return caches, jnp.zeros((batch, cache_len), jnp.int32), jnp.zeros((n, batch), jnp.int32)

    def prefill(self, params, tokens, mask, caches):
        """Every expert reads the prompt: -> (logits [n, B, V] of its last position, caches)."""
        outs = [self.experts.model(e).extend(self.experts.params_of(params, e), tokens,
                                             caches[e], mask, last_only=True)
                for e in range(self.experts.n)]
        return (jnp.stack([o.logits[:, 0, :self.vocab] for o, _ in outs]),
                tuple(c for _, c in outs))

    def step(self, params, tokens, done, k, caches, step: StepState):
        """One step: tokens [B, 1] fed, k [B] each row's expert -> (the selected experts'
        logits [B, V], caches, StepState)."""
        b = tokens.shape[0]
        hist = _write_at(step.hist, tokens[:, 0], step.t)
        active = jnp.ones((b,), bool) if done is None else jnp.logical_not(done)
        selected = jnp.zeros((b, self.vocab), jnp.float32)
        out, synced = [], []
        for e in range(self.experts.n):
            need = (k == e) & active
            # The expert's params are taken inside its branch: a skipped expert reads nothing.
            run = functools.partial(self._turn, e, params, hist, active, step.t)
            skip = lambda cache, s: (cache, jnp.zeros((b, self.vocab), jnp.float32), s)
            cache, logits, s = jax.lax.cond(jnp.any(need), run, skip, caches[e], step.synced[e])
            selected = jnp.where(need[:, None], logits, selected)
            out.append(cache)
            synced.append(s)
        return selected, tuple(out), StepState(step.t + 1, hist, jnp.stack(synced))

    def verify(self, params, chunk, active, k, caches, step: StepState):
        """A drafted chunk [B, W] fed at each row's positions t..t+W-1 (t = step.t), k [B, W]
        the expert each position needs (speculative.py): every expert that an active row
        needs anywhere in the chunk first reads the tokens it missed, then the whole chunk
        in one pass -> (the selected experts' logits [B, W, V], caches, hist, ran [n] bool:
        which experts read the chunk). Every row of an expert that ran wrote W slots: the
        caller rewinds the rejected ones (cache.rewind) and sets `synced`."""
        b, w = chunk.shape
        hist = jax.vmap(lambda row, c, i: jax.lax.dynamic_update_slice(row, c, (i,)))(
            step.hist, chunk, step.t)
        selected = jnp.zeros((b, w, self.vocab), jnp.float32)
        out, ran = [], []
        for e in range(self.experts.n):
            need = jnp.any((k == e) & active[:, None])
            run = functools.partial(self._read_chunk, e, params, hist, active, step.t, chunk)
            skip = lambda cache, s: (cache, jnp.zeros((b, w, self.vocab), jnp.float32))
            cache, logits = jax.lax.cond(need, run, skip, caches[e], step.synced[e])
            selected = jnp.where((k == e)[..., None], logits, selected)
            out.append(cache)
            ran.append(need)
        return selected, tuple(out), hist, jnp.stack(ran)

    def _read_chunk(self, e, group_params, hist, active, t, chunk, cache, synced):
        """Expert e: every active row reads hist[synced : t] (what it missed), then every row
        the chunk [B, W] -> (cache, logits [B, W, V])."""
        model = self.experts.model(e)
        p = self.experts.params_of(group_params, e)
        n_miss = jnp.where(active, t - synced, 0)
        cache = jax.lax.cond(
            jnp.any(n_miss > 0),
            lambda c: self._read_missed(model, p, hist, c, synced, n_miss)[0],
            lambda c: c, cache)
        out, cache = model.extend(p, chunk, cache)
        return cache, out.logits[..., :self.vocab]

    def finish(self, params, caches, step: StepState):
        """Every expert catches up on the tokens it has not read, so each cache holds the
        prompt and every fed token, as after eager decoding -> (caches, StepState)."""
        out, synced = [], []
        for e in range(self.experts.n):
            model = self.experts.model(e)
            p = self.experts.params_of(params, e)
            n_miss = step.t - step.synced[e]
            cache, s, n_miss = self._catch_up_long(model, p, step.hist, caches[e],
                                                   step.synced[e], n_miss)
            _, cache = model.catch_up(p, self._gather(step.hist, s, self.width), n_miss, cache)
            out.append(cache)
            synced.append(s + n_miss)
        return tuple(out), step._replace(synced=jnp.stack(synced))

    def _gather(self, hist, start, width):
        """hist[b, start[b] : start[b] + width] for every row (clipped at the end): [B, width]."""
        idx = jnp.minimum(start[:, None] + jnp.arange(width)[None, :], hist.shape[1] - 1)
        return jnp.take_along_axis(hist, idx, axis=1)

    def _catch_up_long(self, model, p, hist, cache, synced, n_miss):
        """Full chunks of `width` tokens for the rows more than one chunk behind."""
        w = self.width

        def body(carry):
            cache, synced, n_miss = carry
            nv = jnp.where(n_miss > w, w, 0)
            _, cache = model.catch_up(p, self._gather(hist, synced, w), nv, cache)
            return cache, synced + nv, n_miss - nv

        return jax.lax.while_loop(lambda c: jnp.any(c[2] > w), body, (cache, synced, n_miss))

    def _read_missed(self, model, p, hist, cache, synced, n_miss):
        """Each row reads hist[synced : synced + n_miss]: full chunks of `width`, then one
        last chunk of the smallest of `widths` that holds the rest -> (cache, the model's
        output at each row's last real token [B, 1, ...])."""
        cache, synced, n_miss = self._catch_up_long(model, p, hist, cache, synced, n_miss)

        def last_chunk(width):
            def run(cache):
                out, cache = model.catch_up(p, self._gather(hist, synced, width), n_miss, cache)
                return cache, out
            return run

        widths = jnp.asarray(self.widths, jnp.int32)
        branch = jnp.searchsorted(widths, jnp.max(n_miss)).astype(jnp.int32)
        return jax.lax.switch(branch, [last_chunk(w) for w in self.widths], cache)

    def _turn(self, e, group_params, hist, active, t, cache, synced):
        """Expert e, selected by some row: every active row reads the tokens it missed and
        the current one (hist[synced : t + 1]) -> (cache, logits [B, V] of the current
        position, synced). Rows that did not select it catch up too, at no extra weight
        reads: the expert then stays in step with the whole batch while it is in use, so a
        large batch with mixed routing reads one-token chunks as eager decoding would,
        instead of chunks as wide as the longest gap of any row."""
        model = self.experts.model(e)
        p = self.experts.params_of(group_params, e)
        n_miss = jnp.where(active, t + 1 - synced, 0)
        cache, out = self._read_missed(model, p, hist, cache, synced, n_miss)
        logits = out.logits[:, 0, :self.vocab]
        return cache, logits, jnp.where(active, t + 1, synced)
