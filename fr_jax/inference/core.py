"""The chunked decoder every decoder builds on, and the plain one-model `Decoder`.

Left-padded batched prefill, then a jitted `lax.scan` of `chunk` steps per call; the host
stops once every row has emitted an end-of-sequence id, so short answers do not pay for
`max_new_tokens`. Subclasses say which models run and how their logits become one
next-token distribution (fused.py).
"""

from __future__ import annotations

import dataclasses
import time
from typing import NamedTuple, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from fr_jax.inference.sampling import Sampling, sample
from fr_jax.models import Model
from fr_jax.runtime import distributed
from fr_jax.runtime import sharding as sh
from fr_jax.runtime.errors import CacheOverflowError


PADDING = -2  # "chosen expert" after a row's EOS


class Record(NamedTuple):
    """What one decode step emits, per row: token [B], chosen expert [B], weights [B, n]."""

    token: jax.Array
    chosen: jax.Array
    route_probs: jax.Array


class DecodeState(NamedTuple):
    """The scan carry. token, done: [B]; key: RNG; caches of whatever models the mode runs."""

    token: jax.Array  # last emitted token, input of the next step
    done: jax.Array  # row has emitted an EOS id
    key: jax.Array
    caches: Tuple


@dataclasses.dataclass
class DecodeResult:
    tokens: np.ndarray  # [B, n] generated ids (pad after a row's EOS)
    lengths: np.ndarray  # [B] generated tokens per row, EOS included
    chosen: np.ndarray  # [B, n] expert that produced each token (-1 router, -2 padding)
    route_probs: np.ndarray  # [B, n, n_experts] routing weights (0 where no router ran)
    prompt_lengths: np.ndarray  # [B]
    steps: int  # decode steps actually run (after prefill)
    seconds_prefill: float  # includes compilation on the first call
    seconds_decode: float
    caches: object = None  # the decoder's caches after the last step (return_caches=True)
    # Speculative decoding (speculative.py): drafted tokens per expert pass (0 = off), and
    # per row the expert passes it took and the drafts they kept.
    speculate: int = 0
    spec_passes: Optional[np.ndarray] = None  # [B]
    spec_accepted: Optional[np.ndarray] = None  # [B]

    def row(self, b: int):
        """(token ids, chosen experts) of row b, without the padding after EOS."""
        n = int(self.lengths[b])
        return self.tokens[b, :n].tolist(), self.chosen[b, :n].tolist()


def decode_slots(max_new_tokens: int, chunk: int) -> int:
    """Cache slots decoding needs beyond the prompt: every generated token but the last is
    fed back, in whole chunks of `chunk` scan steps."""
    return -(-(max_new_tokens - 1) // chunk) * chunk


def answer_slots(max_new_tokens: int, chunk: int, speculate: int = 0) -> int:
    """Cache slots an answer needs beyond its prompt: `decode_slots`, or speculating
    (speculative.py) every new token and the drafts read past the last one."""
    return max(decode_slots(max_new_tokens, chunk),
               max_new_tokens + speculate if speculate else 0)


def settle(nxt, chosen, done, eos_ids, pad_id, eos_ends=True):
    """A step's drawn tokens [B] and chosen experts [B] where rows that were already done
    hold the pad id and PADDING, and the rows done after it (an end id drawn where
    `eos_ends` [B] lets one end the row) -> (tokens, chosen, done)."""
    nxt = jnp.where(done, pad_id, nxt)
    chosen = jnp.where(done, PADDING, chosen)
    return nxt, chosen, done | (jnp.isin(nxt, eos_ids) & eos_ends)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, width: int = 0):
    """Ragged prompts -> (tokens [B, T] int32, mask [B, T] bool), padded on the left to
    T = max(width, the longest prompt)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt must have at least one token")
    width = max(width, max(len(p) for p in prompts))
    tokens = np.full((len(prompts), width), pad_id, np.int32)
    mask = np.zeros((len(prompts), width), bool)
    for b, p in enumerate(prompts):
        tokens[b, width - len(p):] = p
        mask[b, width - len(p):] = True
    return tokens, mask


class ChunkedDecoder:
    """The host side shared by every decoder: pad, size the cache, prefill, then run the
    jitted scan `chunk` steps at a time until every row is done or the budget is spent.

    Subclasses provide `_logits(params, tokens [B,T], mask, caches, done [B])` -> (scores
    [B, V] to sample from, chosen [B], route_probs [B, n], caches) and
    `_init_caches(b, len)`; `_finish(params, caches)` may complete the caches at the end.
    """

    n_experts: int = 1

    def __init__(self, sampling: Sampling = Sampling(), chunk: int = 16, mesh=None):
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        self.sampling = sampling
        self.chunk = chunk
        self.mesh = mesh
        self._jitted = {}

    # ---- pure pieces (traced)
    def _emit(self, params, tokens, mask, state: DecodeState, eos_ids, pad_id):
        scores, chosen, probs, caches = self._logits(params, tokens, mask, state.caches,
                                                     state.done)
        key, sub = jax.random.split(state.key)
        nxt, chosen, done = settle(sample(scores, sub, self.sampling), chosen, state.done,
                                   eos_ids, pad_id)
        return DecodeState(nxt, done, key, caches), Record(nxt, chosen, probs)

    def _prefill(self, params, tokens, mask, key, caches, eos_ids, pad_id):
        b = tokens.shape[0]
        state = DecodeState(jnp.zeros((b,), jnp.int32), jnp.zeros((b,), bool), key, caches)
        return self._emit(params, tokens, mask, state, eos_ids, pad_id)

    def _chunk(self, params, state, eos_ids, pad_id):
        def body(state, _):
            return self._emit(params, state.token[:, None], None, state, eos_ids, pad_id)
        return jax.lax.scan(body, state, None, length=self.chunk)

    # ---- compiled entry points (with shardings on a mesh)
    # Replicated scalar arguments after the caches (prefill) or the state (chunk): the end
    # ids [n_eos] and the pad id; a subclass may add more (its entry points take them).
    n_scalars = 2

    def _state_shardings(self, rows, rep, caches):
        return DecodeState(rows, rows, rep, caches)

    def _record_shardings(self, batch: int):
        """(the prefill's record, one chunk's records [chunk, ...]) shardings."""
        rec = Record(*(sh.batch_sharding(self.mesh, s)
                       for s in ((batch,), (batch,), (batch, self.n_experts))))
        return rec, Record(*(sh.NamedSharding(self.mesh, sh.P(None, *r.spec)) for r in rec))

    def _compiled(self, params, batch: int, cache_len: int):
        key = (batch, cache_len)
        if key in self._jitted:
            return self._jitted[key]
        if self.mesh is None:
            fns = (jax.jit(self._prefill, donate_argnums=(4,)),
                   jax.jit(self._chunk, donate_argnums=(1,)))
        else:
            p_sh = jax.tree.map(lambda x: x.sharding, params)
            c_sh = self._cache_shardings(
                jax.eval_shape(lambda: self._init_caches(batch, cache_len)))
            rows = sh.batch_sharding(self.mesh, (batch,))
            rep = sh.replicated(self.mesh)
            state_sh = self._state_shardings(rows, rep, c_sh)
            rec_sh, chunk_rec = self._record_shardings(batch)
            tok_sh = sh.batch_sharding(self.mesh, (batch, 1))
            scalars = (rep,) * self.n_scalars
            fns = (jax.jit(sh.traced_on(self._prefill, self.mesh), donate_argnums=(4,),
                           in_shardings=(p_sh, tok_sh, tok_sh, rep, c_sh) + scalars,
                           out_shardings=(state_sh, rec_sh)),
                   jax.jit(sh.traced_on(self._chunk, self.mesh), donate_argnums=(1,),
                           in_shardings=(p_sh, state_sh) + scalars,
                           out_shardings=(state_sh, chunk_rec)))
        self._jitted[key] = fns
        return fns

    def compiled_programs(self, params, batch: int, prompt_len: int, cache_len: int,
                          n_eos: int = 2):
        """((prefill, its abstract args), (chunk, its abstract args)) for a batch of
        `batch` prompts left-padded to `prompt_len` and caches of `cache_len` slots: the
        jitted entry points `generate` runs, for ahead-of-time compilation (fr_jax.plan).
        `params` may be ShapeDtypeStructs carrying their shardings."""
        prefill, chunk = self._compiled(params, batch, cache_len)
        tok = jax.ShapeDtypeStruct((batch, prompt_len), jnp.int32)
        scalar = jax.ShapeDtypeStruct((), jnp.int32)
        scalars = (jax.ShapeDtypeStruct((n_eos,), jnp.int32),) + (scalar,) * (self.n_scalars - 1)
        args = (params, tok, jax.ShapeDtypeStruct((batch, prompt_len), bool),
                jax.eval_shape(lambda: jax.random.key(0)),
                jax.eval_shape(lambda: self._init_caches(batch, cache_len))) + scalars
        state = jax.eval_shape(self._prefill, *args)[0]
        return (prefill, args), (chunk, (params, state) + scalars)

    def _finish(self, params, caches):
        """The caches handed back to a caller that asked for them (e.g. a multi-turn chat)."""
        return caches

    def _place_caches(self, caches):
        if self.mesh is None:
            return caches
        return jax.device_put(caches, self._cache_shardings(caches))

    def answer_slots(self, max_new_tokens: int) -> int:
        """Cache slots an answer of max_new_tokens needs past its prompt."""
        return decode_slots(max_new_tokens, self.chunk)

    def _answer_said(self, max_new_tokens: int) -> Tuple[str, str]:
        """What an answer's cache slots are made of, and what lowers them (the overflow
        error's words)."""
        return (f"{max_new_tokens} new tokens (rounded to chunks of {self.chunk})",
                "lower max_new_tokens")

    def _begin(self, prompts, max_new_tokens, pad_id, width, cache_len, eos_ids):
        """What generate() does before the prefill: the prompts left-padded, the cache's
        length (checked to hold them and the answer), the end ids and the pad as arrays
        -> (tokens [B, T], mask [B, T], cache_len, eos, pad)."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        tokens, mask = left_pad(prompts, pad_id, width)
        t = tokens.shape[1]
        need = t + self.answer_slots(max_new_tokens)
        cache_len = cache_len or need
        if need > cache_len:
            answer, lower = self._answer_said(max_new_tokens)
            raise CacheOverflowError(
                f"prompt of {t} tokens + {answer} need {need} cache slots but the cache has "
                f"{cache_len}; raise cache_len, {lower}, or truncate the prompt")
        eos = jnp.asarray(sorted(set(eos_ids)) or [-1], jnp.int32)
        return tokens, mask, cache_len, eos, jnp.asarray(pad_id, jnp.int32)

    def generate(self, params, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                 eos_ids: Sequence[int], pad_id: int = 0, seed: int = 0,
                 cache_len: Optional[int] = None, width: int = 0,
                 return_caches: bool = False) -> DecodeResult:
        """Decodes a batch of token-id prompts (ragged; left-padded here to at least
        `width`, so batches of one padded width share one compiled prefill)."""
        tokens, mask, cache_len, eos, pad = self._begin(prompts, max_new_tokens, pad_id, width,
                                                        cache_len, eos_ids)
        b = tokens.shape[0]
        prefill, chunk = self._compiled(params, b, cache_len)

        t0 = time.perf_counter()
        caches = self._place_caches(self._init_caches(b, cache_len))
        state, first = prefill(params, jnp.asarray(tokens), jnp.asarray(mask),
                               jax.random.key(seed), caches, eos, pad)
        # distributed.fetch: rows sharded over several processes are gathered on each.
        records = [jax.tree.map(lambda x: x[:, None], distributed.fetch(first))]
        t1 = time.perf_counter()
        steps = 0
        while steps + 1 < max_new_tokens and not bool(np.all(distributed.fetch(state.done))):
            state, recs = chunk(params, state, eos, pad)
            records.append(jax.tree.map(lambda x: np.swapaxes(x, 0, 1), distributed.fetch(recs)))
            steps += self.chunk
        t2 = time.perf_counter()
        caches = self._finish(params, state.caches) if return_caches else None

        gen, chosen, probs = (np.concatenate(parts, axis=1)[:, :max_new_tokens]
                              for parts in zip(*records))
        lengths = np.full((b,), gen.shape[1])
        eos_np = np.asarray(eos)
        for row in range(b):
            hits = np.flatnonzero(np.isin(gen[row], eos_np))
            if hits.size:  # the scan already padded what follows
                lengths[row] = hits[0] + 1
        return DecodeResult(gen, lengths, chosen, probs, mask.sum(1), steps, t1 - t0, t2 - t1,
                            caches)


class Decoder(ChunkedDecoder):
    """One plain model (no router, no fusion): the reference single-model decode."""

    def __init__(self, model: Model, sampling: Sampling = Sampling(), chunk: int = 16,
                 mesh=None):
        super().__init__(sampling, chunk, mesh)
        self.model = model

    def _init_caches(self, batch, cache_len):
        return (self.model.init_cache(batch, cache_len),)

    def _cache_shardings(self, caches):
        return (sh.cache_shardings(caches[0], self.mesh),)

    def _logits(self, params, tokens, mask, caches, done=None):
        out, cache = self.model.extend(params, tokens, caches[0], mask, last_only=True)
        b = tokens.shape[0]
        return (out.logits[:, 0], jnp.zeros((b,), jnp.int32), jnp.zeros((b, 1), jnp.float32),
                (cache,))
