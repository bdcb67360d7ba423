"""Self-speculative FusionRoute: the router drafts, the selected experts verify a chunk.

One speculative step, per row: the router alone proposes `k` tokens from its own logits,
reading them one at a time (k + 1 one-token steps: its hidden states do not depend on the
experts, so the same steps give its complementary logits and routing weights at every
drafted position); every expert selected anywhere in the chunk [last token, d_1 .. d_k]
reads it in one pass; the mode's rule fuses the router and the expert selected at each
position exactly as plain decoding does. Greedy keeps the drafts while each equals the
fused argmax and takes the fused token at the first mismatch (or after the last draft):
1 to k + 1 tokens per expert pass, the tokens of plain decoding. Sampling follows the
speculative-sampling rule (draft q = the router's distribution, target p = the fused one,
both after temperature / top-k / top-p): a draft d is kept with probability
min(1, p(d) / q(d)), the first one refused is replaced by a draw from max(p - q, 0)
normalised, and after k kept drafts one more token is drawn from p -- the tokens are
distributed as plain sampling's.

Caches are position-addressed (fr_jax/models/cache.py): the positions of refused drafts
are rewound (`cache.rewind`) and overwritten by the next chunk. Rows move on by different
amounts; a row stops at an end id or at its budget of new tokens.
"""

from __future__ import annotations

import time
from typing import NamedTuple, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from fr_jax.inference.core import PADDING, DecodeResult, answer_slots
from fr_jax.inference.fused import FusedDecoder
from fr_jax.inference.lazy import StepState
from fr_jax.inference.sampling import filter_logits, filter_rows, sample, sample_rows
from fr_jax.models.cache import KVCache, rewind
from fr_jax.routing.fusion import log_softmax, select_expert
from fr_jax.runtime import distributed
from fr_jax.runtime import sharding as sh
from fr_jax.runtime.errors import ModeError


class SpecState(NamedTuple):
    """The scan carry. token, done, count: [B] (the last emitted token, not yet read; the row
    has ended -- an end id or its budget; tokens generated); key; caches (FusedDecoder's)."""

    token: jax.Array
    done: jax.Array
    key: jax.Array
    caches: tuple
    count: jax.Array


class SpecRecord(NamedTuple):
    """One speculative step, per row: tokens, chosen experts [B, k + 1] and routing weights
    [B, k + 1, n] (padding past `emitted`); emitted [B]: tokens it produced (0 for a row
    already done); accepted [B]: drafts among them (the fused rule agreed; 0..k)."""

    token: jax.Array
    chosen: jax.Array
    route_probs: jax.Array
    emitted: jax.Array
    accepted: jax.Array


class RowSampling(NamedTuple):
    """A sampling setting per row (the serving engine's slots), in place of the decoder's
    one: seed, temperature (0 = greedy), top_k (0 = off), top_p (1 = off), [B] each. A
    row's draws use its own keys, folded from its seed, its count of tokens emitted and
    what the draw is for, so they do not depend on the other rows."""

    seed: jax.Array
    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array

    def keys(self, count, tag):
        """[B] keys for draw `tag` (0..k: drafts, k + 1: acceptance, k + 2: the last
        token) of the step at each row's `count`."""
        return jax.vmap(lambda s, c: jax.random.fold_in(
            jax.random.fold_in(jax.random.key(s), c), tag))(self.seed, count)

    def dist(self, scores):
        """Log-scores [B, W, V] -> the probabilities each row samples from [B, W, V]
        (a greedy row's are unused)."""
        b, w, v = scores.shape
        temp = jnp.where(self.temperature > 0, self.temperature, 1.0)
        flat = (scores.astype(jnp.float32) / temp[:, None, None]).reshape(b * w, v)
        flat = filter_rows(flat, jnp.repeat(self.top_k, w), jnp.repeat(self.top_p, w))
        return jax.nn.softmax(flat, axis=-1).reshape(b, w, v)


def _greedy_accept(scores, drafts):
    """Kept drafts [B] (while each equals the fused argmax) and the fused argmax after
    them [B]."""
    y = jnp.argmax(scores, axis=-1).astype(jnp.int32)
    n_acc = jnp.sum(jnp.cumprod(drafts == y[:, :-1], axis=1), axis=1)
    return n_acc, y[jnp.arange(y.shape[0]), n_acc]


def _sampled_accept(p, qd, drafts, u, draw):
    """The speculative-sampling rule: p, qd [B, W, V] target and draft probabilities, u
    [B, k] uniforms, draw(log-probs [B, V]) -> [B] -> (kept drafts [B], the token after
    them [B])."""
    b, w, _ = p.shape
    rows = jnp.arange(b)
    pick = lambda d: jnp.take_along_axis(d[:, :-1], drafts[..., None], axis=-1)[..., 0]
    n_acc = jnp.sum(jnp.cumprod(u * pick(qd) < pick(p), axis=1), axis=1)
    p_n, q_n = p[rows, n_acc], qd[rows, n_acc]
    resid = jnp.maximum(p_n - q_n, 0.0)
    # after k kept drafts (or where p <= q everywhere, i.e. p == q) draw from p itself
    plain = (n_acc == w - 1) | (jnp.sum(resid, axis=-1) <= 0.0)
    target = jnp.where(plain[:, None], p_n, resid)
    return n_acc, draw(jnp.log(target)).astype(jnp.int32)


def speculates(mode) -> bool:
    """The modes speculative decoding serves: the router and one expert per token."""
    return mode.one_expert_per_token and mode.uses_router


def speculation_off(mode_name: str) -> str:
    """What a command says when decode.speculate is set for a mode it does not serve."""
    return (f"speculative decoding is off for mode {mode_name} (decode.speculate serves "
            "fusionroute, expert_only, sequence, sequence:head)")


def acceptance(passes, kept, k: int) -> dict:
    """Rows' expert passes and drafts kept ([B] each, or totals) -> {"k", "passes",
    "tokens_per_pass": tokens each pass produced on average (its kept drafts and the fused
    rule's own token), "acceptance": the share of drafted tokens kept}."""
    p, a = int(np.sum(passes)), int(np.sum(kept))
    return {"k": int(k), "passes": p, "tokens_per_pass": (a + p) / p if p else 0.0,
            "acceptance": a / (p * k) if p and k else 0.0}


def describe(stats: dict) -> str:
    """One line for a summary: 'speculative (k=4): 2.31 tokens per expert pass, 33% of
    drafts kept'."""
    return (f"speculative (k={stats['k']}): {stats['tokens_per_pass']:.2f} tokens per expert "
            f"pass, {stats['acceptance']:.0%} of drafts kept")


class SpeculativeDecoder(FusedDecoder):
    """FusedDecoder with `speculate` = k drafted tokens per expert pass (k >= 1), for the
    modes that run the router and one expert per token (`fusionroute`, `expert_only`,
    `sequence`, `sequence:head`), eager or lazy experts. `chunk` counts speculative steps
    per jitted call. The router always runs per token here: it is the drafter."""

    def __init__(self, mode, router, experts, speculate: int, **kwargs):
        super().__init__(mode, router, experts, **kwargs)
        if speculate < 1:
            raise ValueError(f"speculate must be >= 1 drafted tokens, got {speculate}")
        if not speculates(mode):
            raise ModeError(f"decode.speculate: mode {mode.name!r} does not run the router "
                            "and one expert per token; speculative decoding serves "
                            "fusionroute, expert_only, sequence and sequence:head "
                            "(set decode.speculate=0 for this mode)")
        self.speculate = int(speculate)
        self.router = router  # the drafter, whatever the mode's own per-token needs

    # ---- pure pieces (traced)
    def _dist(self, scores):
        """The distribution a sampler draws from: log-scores [..., V] -> probabilities."""
        shape = scores.shape
        flat = filter_logits(scores.reshape(-1, shape[-1]).astype(jnp.float32)
                             / self.sampling.temperature, self.sampling.top_k,
                             self.sampling.top_p)
        return jax.nn.softmax(flat, axis=-1).reshape(shape)

    def _draft(self, params, state: SpecState, step: StepState, rc, key,
               rows: Optional[RowSampling] = None):
        """The router reads the last token and its own k drafts, one at a time -> (router
        logits [B, W, V], routing logits [B, W, n], its log-probs [B, W, V], drafts [B, W]
        (the last one unused), router cache), W = k + 1."""
        cap = self.policy.cap

        def body(carry, j):
            x, rc, key = carry
            out, rc = self.router.extend(params["router"], x[:, None], rc, last_only=True)
            r, route = out.logits[:, 0, :self.vocab], out.route_logits[:, 0]
            route = self._forced(route, step.t + 1 + j)
            q = log_softmax(r, cap)
            if rows is None:
                key, sub = jax.random.split(key)
                d = sample(q, sub, self.sampling)
            else:
                d = sample_rows(q, rows.keys(state.count, j), rows.temperature, rows.top_k,
                                rows.top_p)
            return (d, rc, key), (r, route, q, d)

        (_, rc, _), outs = jax.lax.scan(body, (state.token, rc, key),
                                        jnp.arange(self.speculate + 1))
        return tuple(jnp.swapaxes(x, 0, 1) for x in outs) + (rc,)

    def _verify(self, params, chunk, active, k, ec, step: StepState):
        """The experts read the chunk [B, W] -> (the selected experts' logits [B, W, V],
        caches, and with lazy experts which of them ran [n] and the StepState's new hist)."""
        b, w = chunk.shape
        if self._lazy is not None:
            selected, ec, hist, ran = self._lazy.verify(params["experts"], chunk, active, k,
                                                        ec, step)
            return selected, ec, ran, hist
        e_logits, ec = self.experts.extend(params["experts"], chunk, ec)
        e_logits = e_logits[..., :self.vocab]
        n = e_logits.shape[0]
        selected = select_expert(e_logits.reshape(n, b * w, -1), k.reshape(-1))
        return selected.reshape(b, w, -1), ec, None, None

    def _accept(self, scores, q, drafts, key, count, rows: Optional[RowSampling] = None):
        """scores, q [B, W, V] (fused and router log-probs), drafts [B, k] -> (tokens [B, W]:
        the kept drafts then the fused rule's own token, kept drafts [B]). rows: a setting
        per row (greedy rows keep the greedy rule), count [B] keying their draws."""
        b, w, _ = scores.shape
        if rows is not None:
            greedy = _greedy_accept(scores, drafts)
            hot = rows.temperature > 0

            def sampled(_):
                u = jax.vmap(lambda k: jax.random.uniform(k, (w - 1,)))(rows.keys(count, w))
                last = rows.keys(count, w + 1)
                draw = lambda logp: jax.vmap(jax.random.categorical)(last, logp)  # noqa: E731
                drawn = _sampled_accept(rows.dist(scores), rows.dist(q), drafts, u, draw)
                return tuple(jnp.where(hot, x, g) for x, g in zip(drawn, greedy))
            n_acc, final = jax.lax.cond(jnp.any(hot), sampled, lambda _: greedy, None)
        elif self.sampling.greedy:
            n_acc, final = _greedy_accept(scores, drafts)
        else:
            k_acc, k_last = jax.random.split(key)
            u = jax.random.uniform(k_acc, drafts.shape)
            n_acc, final = _sampled_accept(
                self._dist(scores), self._dist(q), drafts, u,
                lambda logp: jax.random.categorical(k_last, logp, axis=-1))
        padded = jnp.concatenate([drafts, jnp.zeros((b, 1), jnp.int32)], axis=1)
        j = jnp.arange(w)[None, :]
        tokens = jnp.where(j < n_acc[:, None], padded, final[:, None])
        return tokens, n_acc.astype(jnp.int32)

    def _spec_step(self, params, state: SpecState, eos_ids, pad_id, limit,
                   rows: Optional[RowSampling] = None, eos_ends=None):
        """One speculative step of every row -> (state, SpecRecord). limit: the budget of
        new tokens ([] or per row [B]); rows: per-row sampling (else the decoder's);
        eos_ends [B]: whether an end id ends the row (None: it does for every row)."""
        rc, ec, seq, step = state.caches
        b, w = state.token.shape[0], self.speculate + 1
        active = jnp.logical_not(state.done)
        key, k_draft, k_acc = jax.random.split(state.key, 3)

        r, route, q, d, rc = self._draft(params, state, step, rc, k_draft, rows)
        drafts = d[:, :-1]
        chunk = jnp.concatenate([state.token[:, None], drafts], axis=1)  # [B, W]
        flat = lambda x: x.reshape((b * w,) + x.shape[2:])
        seq_f = None if seq is None else tuple(jnp.repeat(x, w, axis=0) for x in seq)
        k, with_router = self.policy.selection(flat(route), seq_f)
        selected, ec, ran, hist = self._verify(params, chunk, active, k.reshape(b, w), ec, step)
        scores, chosen, probs = self.policy.from_selected(flat(r), flat(route), flat(selected),
                                                          k, with_router, seq_f)
        scores, chosen = scores.reshape(b, w, -1), chosen.reshape(b, w)
        probs = probs.reshape(b, w, -1)
        tokens, n_acc = self._accept(scores, q, drafts, k_acc, state.count, rows)

        # What the row keeps: up to its first end id, within its budget.
        j = jnp.arange(w)[None, :]
        ends = jnp.isin(tokens, eos_ids) & (j <= n_acc[:, None])
        if eos_ends is not None:
            ends = ends & eos_ends[:, None]
        first_end = jnp.where(jnp.any(ends, axis=1), jnp.argmax(ends, axis=1), w)
        m = jnp.minimum(jnp.minimum(n_acc + 1, first_end + 1), limit - state.count)
        m = jnp.where(active, jnp.maximum(m, 0), 0).astype(jnp.int32)
        keep = j < m[:, None]
        count = state.count + m
        done = state.done | jnp.any(ends & keep, axis=1) | (count >= limit)
        last = jnp.take_along_axis(tokens, jnp.maximum(m - 1, 0)[:, None], axis=1)[:, 0]

        # Forget the refused positions: every model read all W, the row keeps m of them.
        drop = w - m
        rc = rewind(rc, drop)
        if self._lazy is not None:
            ec = tuple(rewind(c, jnp.where(ran[e], drop, 0)) for e, c in enumerate(ec))
            synced = jnp.where(ran[:, None] & active[None, :], step.t[None, :] + m[None, :],
                               step.synced)
            step = StepState(step.t + m, hist, synced)
        else:
            ec = rewind(ec, drop) if isinstance(ec, KVCache) else tuple(
                rewind(c, drop) for c in ec)
            step = step._replace(t=step.t + m)
        rec = SpecRecord(jnp.where(keep, tokens, pad_id), jnp.where(keep, chosen, PADDING),
                         jnp.where(keep[..., None], probs, 0.0), m,
                         jnp.where(active, jnp.minimum(n_acc, m - 1), 0))
        new = SpecState(jnp.where(m > 0, last, state.token), done, key, (rc, ec, seq, step),
                        count)
        return new, rec

    def _prefill(self, params, tokens, mask, key, caches, eos_ids, pad_id, limit):
        state, rec = super()._prefill(params, tokens, mask, key, caches, eos_ids, pad_id)
        count = jnp.ones_like(state.token)
        return SpecState(state.token, state.done | (count >= limit), state.key, state.caches,
                         count), rec

    def _chunk(self, params, state, eos_ids, pad_id, limit, **per_row):
        """Up to `chunk` speculative steps, stopping once every row is done (a row can end
        several tokens into a step, so the last steps of a chunk would often be idle)
        -> (state, SpecRecord with a leading [chunk] axis; steps not run emit nothing).
        per_row: `_spec_step`'s rows and eos_ends (the serving engine's slots)."""
        c, b, w = self.chunk, state.token.shape[0], self.speculate + 1
        i32 = lambda *shape: jnp.zeros((c,) + shape, jnp.int32)
        recs = SpecRecord(i32(b, w), i32(b, w), jnp.zeros((c, b, w, self.n_experts), jnp.float32),
                          i32(b), i32(b))

        def body(carry):
            i, state, recs = carry
            state, rec = self._spec_step(params, state, eos_ids, pad_id, limit, **per_row)
            recs = jax.tree.map(lambda all_, one: all_.at[i].set(one), recs, rec)
            return i + 1, state, recs

        def more(carry):
            i, state, _ = carry
            return (i < self.chunk) & jnp.logical_not(jnp.all(state.done))

        _, state, recs = jax.lax.while_loop(more, body, (jnp.int32(0), state, recs))
        return state, recs

    # ---- compiled entry points: ChunkedDecoder's, with the budget as a third scalar
    n_scalars = 3

    def _state_shardings(self, rows, rep, caches):
        return SpecState(rows, rows, rep, caches, rows)

    def _record_shardings(self, batch: int):
        first, _ = super()._record_shardings(batch)
        w, n = self.speculate + 1, self.n_experts
        steps = lambda shape: sh.NamedSharding(
            self.mesh, sh.P(None, *sh.batch_sharding(self.mesh, shape).spec))
        return first, SpecRecord(steps((batch, w)), steps((batch, w)), steps((batch, w, n)),
                                 steps((batch,)), steps((batch,)))

    def answer_slots(self, max_new_tokens: int) -> int:
        return answer_slots(max_new_tokens, 1, self.speculate)

    def _answer_said(self, max_new_tokens: int) -> Tuple[str, str]:
        return (f"{max_new_tokens} new tokens + {self.speculate} drafted ones "
                "(decode.speculate)", "lower max_new_tokens or decode.speculate")

    def generate(self, params, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                 eos_ids: Sequence[int], pad_id: int = 0, seed: int = 0,
                 cache_len: Optional[int] = None, width: int = 0,
                 return_caches: bool = False) -> DecodeResult:
        """As FusedDecoder.generate; the result also holds each row's expert passes and
        kept drafts (`spec_passes`, `spec_accepted`)."""
        params = self.prepare(params)
        tokens, mask, cache_len, eos, pad = self._begin(prompts, max_new_tokens, pad_id, width,
                                                        cache_len, eos_ids)
        b = tokens.shape[0]
        limit = jnp.asarray(max_new_tokens, jnp.int32)
        prefill, chunk = self._compiled(params, b, cache_len)

        t0 = time.perf_counter()
        caches = self._place_caches(self._init_caches(b, cache_len))
        state, first = prefill(params, jnp.asarray(tokens), jnp.asarray(mask),
                               jax.random.key(seed), caches, eos, pad, limit)
        first = distributed.fetch(first)
        t1 = time.perf_counter()
        parts = []
        while not bool(np.all(distributed.fetch(state.done))):
            state, recs = chunk(params, state, eos, pad, limit)
            parts.append(distributed.fetch(recs))
        # speculative steps run (a chunk stops early once every row is done)
        steps = sum(int(np.sum(np.any(r.emitted > 0, axis=1))) for r in parts)
        t2 = time.perf_counter()
        caches = self._finish(params, state.caches) if return_caches else None
        return self._assemble(first, parts, b, max_new_tokens, pad_id, np.asarray(eos),
                              mask, steps, t1 - t0, t2 - t1, caches)

    def _assemble(self, first, parts, b, max_new, pad_id, eos, mask, steps, t_pre, t_dec,
                  caches) -> DecodeResult:
        n = self.n_experts
        gen = np.full((b, max_new), pad_id, np.int32)
        chosen = np.full((b, max_new), PADDING, np.int32)
        probs = np.zeros((b, max_new, n), np.float32)
        gen[:, 0], chosen[:, 0], probs[:, 0] = first.token, first.chosen, first.route_probs
        fill = np.ones((b,), np.int64)
        passes = np.zeros((b,), np.int64)
        accepted = np.zeros((b,), np.int64)
        for rec in parts:  # fields [steps, B, ...]
            for s in range(rec.emitted.shape[0]):
                for row in np.flatnonzero(rec.emitted[s]):
                    m = int(rec.emitted[s, row])
                    at = fill[row]
                    gen[row, at:at + m] = rec.token[s, row, :m]
                    chosen[row, at:at + m] = rec.chosen[s, row, :m]
                    probs[row, at:at + m] = rec.route_probs[s, row, :m]
                    fill[row] += m
                    passes[row] += 1
                    accepted[row] += int(rec.accepted[s, row])
        lengths = fill.copy()
        for row in range(b):
            hits = np.flatnonzero(np.isin(gen[row, :fill[row]], eos))
            if hits.size:
                lengths[row] = hits[0] + 1
        return DecodeResult(gen, lengths, chosen, probs, mask.sum(1), steps, t_pre, t_dec,
                            caches, spec_passes=passes, spec_accepted=accepted,
                            speculate=self.speculate)
