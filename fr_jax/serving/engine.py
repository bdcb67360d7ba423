"""Continuous batching on a decoder: a fixed number of slots, requests admitted between
decode chunks, each finished slot freed at once.

Each slot is one row of every cache the decoder carries (the router's and every expert's
KV caches, the lazy schedule's token history and sync counters, a sequence mode's
per-prompt choice). The per-row offsets and positions of the caches (fr_jax/models/cache.py)
and the per-row step counters of the lazy schedule (fr_jax/inference/lazy.py) let the rows
stand at different places: a new request is prefilled alone (its prompt left-padded to a
length bucket, so the number of prefill programs is bounded), its row written into a free
slot, and the next chunk of the jitted scan moves every slot on. A slot's tokens do not
depend on the other slots: its greedy answer is the one `generate` gives for its prompt
alone, and a sampled one draws from its own key (its seed folded with the token's index).

Programs: one prefill per bucket, one `insert`, one decode chunk -- `Engine.programs`;
`warm_up` compiles them all before a server says it is ready.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
from typing import Deque, List, NamedTuple, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from fr_jax.inference.core import Record, left_pad, settle
from fr_jax.inference.sampling import sample_rows
from fr_jax.runtime import sharding as sh
from fr_jax.runtime.errors import CacheOverflowError


@dataclasses.dataclass
class Request:
    """One generation: prompt token ids and how to sample. The engine fills `tokens`,
    `experts` (the expert that produced each token; -1 the router alone) and
    `finish_reason` ("stop": an end id; "length": max_tokens; "cancelled")."""

    prompt: Sequence[int]
    max_tokens: int
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    stop_ids: Tuple[int, ...] = ()  # ends the answer besides the lineup's end ids
    ignore_eos: bool = False  # the lineup's end ids do not end it (fixed-length benchmarks)
    id: int = -1
    tokens: List[int] = dataclasses.field(default_factory=list)
    experts: List[int] = dataclasses.field(default_factory=list)
    finish_reason: Optional[str] = None
    spec_passes: int = 0  # speculative decoding: expert passes, and drafts kept in them
    spec_accepted: int = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class Event(NamedTuple):
    """What one engine step added to a request: its new tokens and their experts, and
    whether it is finished now."""

    request: Request
    tokens: List[int]
    experts: List[int]
    finished: bool


class SlotState(NamedTuple):
    """The engine's carry, one row per slot. token: last emitted [S]; done [S]; count:
    tokens emitted [S] (the index folded into the slot's key); seed, temperature, top_k,
    top_p: the request's sampling [S]; limit: its max_tokens [S]; caches: the decoder's."""

    token: jax.Array
    done: jax.Array
    count: jax.Array
    seed: jax.Array
    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    limit: jax.Array
    caches: tuple


def default_buckets(longest: int, smallest: int = 16) -> Tuple[int, ...]:
    """Prompt lengths a prefill is compiled for: powers of two from `smallest`, then
    `longest` itself."""
    out, n = [], smallest
    while n < longest:
        out.append(n)
        n *= 2
    return tuple(out) + (longest,)


def _batch_axes(init_caches, cache_len: int):
    """For every leaf of the decoder's caches, the axis that holds the rows (found by
    comparing the shapes of a 1-row and a 2-row cache), or None for a leaf with no row."""
    one = jax.eval_shape(lambda: init_caches(1, cache_len))
    two = jax.eval_shape(lambda: init_caches(2, cache_len))

    def axis(a, b):
        diff = [i for i, (x, y) in enumerate(zip(a.shape, b.shape)) if x != y]
        return diff[0] if diff else None
    return jax.tree.map(axis, one, two)


class Engine:
    """`slots` rows of `decoder` (a FusedDecoder or a plain Decoder) with caches of
    `cache_len` slots each, serving `Request`s: `submit`, then `step` until `idle`.

    A request is admitted when a slot is free and its prompt, left-padded to its bucket,
    leaves room for its answer (`answer_slots(max_tokens)` more cache slots);
    otherwise `submit` refuses it (CacheOverflowError). Not thread-safe: one thread steps
    it (the server's engine thread)."""

    def __init__(self, decoder, params, slots: int, cache_len: int, eos_ids: Sequence[int],
                 pad_id: int, buckets: Optional[Sequence[int]] = None, place: bool = True):
        if slots < 1:
            raise ValueError(f"slots must be >= 1, got {slots}")
        self.decoder, self.slots, self.cache_len = decoder, slots, cache_len
        self.chunk = decoder.chunk
        self.params = decoder.prepare(params) if hasattr(decoder, "prepare") else params
        self.eos = jnp.asarray(sorted(set(eos_ids)) or [-1], jnp.int32)
        self._eos = set(int(x) for x in eos_ids)
        self.pad = jnp.asarray(pad_id, jnp.int32)
        self.pad_id = pad_id
        longest = cache_len - self.answer_slots(1)
        self.buckets = tuple(sorted(set(buckets))) if buckets else default_buckets(longest)
        if self.buckets[-1] > cache_len:
            raise ValueError(f"prompt bucket {self.buckets[-1]} exceeds cache_len {cache_len}")
        self._axes = _batch_axes(decoder._init_caches, cache_len)
        self._compile(decoder.mesh)
        self._ids = itertools.count()
        if place:  # False: abstract params, programs to compile ahead of time (`lowerable`)
            self.reset()

    def _compile(self, mesh):
        """The jitted programs; on a mesh with the decoder's placement: slot rows over the
        batch axes, caches as `generate` shards them, params where the lineup put them."""
        if mesh is None:
            self._prefill = jax.jit(self._prefill_row)  # once per bucket (its shape)
            self._insert = jax.jit(self._insert_row, donate_argnums=(0,))
            self._chunk = jax.jit(self._run_chunk, donate_argnums=(1,))
            self._placement = self._row_placement = self._small = None
            return
        rep = sh.replicated(mesh)
        rows = sh.batch_sharding(mesh, (self.slots,))
        caches = lambda b: self.decoder._cache_shardings(  # noqa: E731
            jax.eval_shape(lambda: self.decoder._init_caches(b, self.cache_len)))
        state = SlotState(*([rows] * 8), caches(self.slots))
        row = Record(rep, rep, rep)
        chunk = self._record_shardings(mesh, rows, rep)
        self._placement, self._row_placement, self._small = state, caches(1), rep
        self._prefill = jax.jit(sh.traced_on(self._prefill_row, mesh),
                                out_shardings=(caches(1), row))
        self._insert = jax.jit(sh.traced_on(self._insert_row, mesh), donate_argnums=(0,),
                               out_shardings=state)
        self._chunk = jax.jit(sh.traced_on(self._run_chunk, mesh), donate_argnums=(1,),
                              out_shardings=(state, chunk))

    def _record_shardings(self, mesh, rows, rep):
        """Where the chunk's Record [chunk, S] lands: steps replicated, slots as the rows."""
        return Record(*([sh.NamedSharding(mesh, sh.P(None, *rows.spec))] * 2), rep)

    def answer_slots(self, max_tokens: int) -> int:
        """Cache slots an answer of max_tokens may write past its prompt: the decoder's own
        count (a plain chunk runs to its end; a speculative row reads k drafts past it)."""
        return self.decoder.answer_slots(max_tokens)

    def reset(self):
        """Every slot free, the queue empty (after a failed step: the caches may be gone)."""
        self.state = self._empty_state()
        self.requests: List[Optional[Request]] = [None] * self.slots
        self.pending: Deque[Request] = collections.deque()

    # ---------------------------------------------------------------- traced pieces
    def _empty_state(self) -> SlotState:
        state = self._zero_state()
        return state if self._placement is None else jax.device_put(state, self._placement)

    def _zero_state(self) -> SlotState:
        s = self.slots
        return SlotState(jnp.zeros((s,), jnp.int32), jnp.ones((s,), bool),
                         jnp.zeros((s,), jnp.int32), jnp.zeros((s,), jnp.int32),
                         jnp.zeros((s,), jnp.float32), jnp.zeros((s,), jnp.int32),
                         jnp.ones((s,), jnp.float32), jnp.zeros((s,), jnp.int32),
                         self.decoder._init_caches(s, self.cache_len))

    def lowerable(self):
        """[(name, jitted program, abstract arguments)] of every program the engine runs
        (each bucket's prefill, insert, the chunk), for ahead-of-time compilation
        (fr_jax.plan); the params may be ShapeDtypeStructs carrying their shardings."""
        def sds(shape, dtype, sharding=None):
            return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding or self._small)

        def placed(tree, shardings):
            if shardings is None:
                return tree
            return jax.tree.map(lambda x, s: sds(x.shape, x.dtype, s), tree, shardings)
        i32, f32 = jnp.int32, jnp.float32
        state = placed(jax.eval_shape(self._zero_state), self._placement)
        row = placed(jax.eval_shape(lambda: self.decoder._init_caches(1, self.cache_len)),
                     self._row_placement)
        one = [sds((1,), t) for t in (i32, f32, i32, f32)]  # seed, temperature, top_k, top_p
        out = [(f"prefill, bucket {b}", self._prefill,
                (self.params, sds((1, b), i32), sds((1, b), bool), *one))
               for b in self.buckets]
        out.append(("insert", self._insert, (state, row, sds((1,), i32), sds((), i32),
                                             sds((), bool), sds((), i32),
                                             *(sds((), x.dtype) for x in one))))
        out.append(("chunk", self._chunk, (self.params, state, sds((self.slots,), bool),
                                           sds((self.slots,), bool))))
        return out

    def _draw(self, scores, seed, count, temperature, top_k, top_p):
        keys = jax.vmap(lambda s, c: jax.random.fold_in(jax.random.key(s), c))(seed, count)
        return sample_rows(scores, keys, temperature, top_k, top_p)

    def _prefill_row(self, params, tokens, mask, seed, temperature, top_k, top_p):
        """One prompt [1, L] -> (its caches as one row, first token, expert, weights)."""
        caches = self.decoder._init_caches(1, self.cache_len)
        scores, chosen, probs, caches = self.decoder._logits(params, tokens, mask, caches,
                                                             jnp.zeros((1,), bool))
        first = self._draw(scores, seed, jnp.zeros((1,), jnp.int32), temperature, top_k, top_p)
        return caches, Record(first, chosen, probs)

    def _insert_row(self, state: SlotState, caches, first, slot, eos_ends, limit, seed,
                    temperature, top_k, top_p):
        """state with slot `slot` holding the prefilled row (eos_ends: an end id ends it;
        limit: its max_tokens)."""
        def put(big, row, axis):
            if axis is None:
                return big
            return jax.lax.dynamic_update_slice_in_dim(big, row.astype(big.dtype), slot, axis)
        one = lambda big, value: big.at[slot].set(value[0] if value.ndim else value)
        return SlotState(
            one(state.token, first), one(state.done, jnp.isin(first, self.eos) & eos_ends),
            one(state.count, jnp.ones((), jnp.int32)), one(state.seed, seed),
            one(state.temperature, temperature), one(state.top_k, top_k),
            one(state.top_p, top_p), one(state.limit, limit),
            jax.tree.map(put, state.caches, caches, self._axes))

    def _run_chunk(self, params, state: SlotState, active, eos_ends):
        """`chunk` decode steps of every slot (an inactive slot is done; eos_ends [S]: an
        end id ends the slot's row) -> (state, Record of [chunk, S] arrays)."""
        state = state._replace(done=state.done | ~active)

        def body(state, _):
            scores, chosen, probs, caches = self.decoder._logits(
                params, state.token[:, None], None, state.caches, state.done)
            nxt = self._draw(scores, state.seed, state.count, state.temperature, state.top_k,
                             state.top_p)
            nxt, chosen, done = settle(nxt, chosen, state.done, self.eos, self.pad, eos_ends)
            return state._replace(token=nxt, done=done, count=state.count + 1,
                                  caches=caches), Record(nxt, chosen, probs)
        return jax.lax.scan(body, state, None, length=self.chunk)

    # ---------------------------------------------------------------- host side
    @property
    def programs(self) -> int:
        """Compiled programs the engine runs: one prefill per bucket, insert, the chunk."""
        return len(self.buckets) + 2

    def bucket(self, n: int) -> int:
        for b in self.buckets:
            if b >= n:
                return b
        raise CacheOverflowError(f"a prompt of {n} tokens is longer than the longest prompt "
                                 f"bucket ({self.buckets[-1]} tokens)")

    def room(self, n: int) -> int:
        """The most new tokens a prompt of `n` tokens can ask for (0: none): answer_slots
        inverted, by bisection (it grows with max_tokens, and is at least max_tokens - 1)."""
        free = self.cache_len - self.bucket(n)
        lo, hi = 0, max(free + 1, 0)  # answer_slots(lo) fits (or lo = 0); hi is an upper bound
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if self.answer_slots(mid) <= free else (lo, mid - 1)
        return lo

    def check(self, request: Request):
        """Raises CacheOverflowError when the request can never fit a slot."""
        if not request.prompt:
            raise ValueError("the prompt has no tokens")
        if request.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {request.max_tokens}")
        need = self.bucket(len(request.prompt)) + self.answer_slots(request.max_tokens)
        if need > self.cache_len:
            raise CacheOverflowError(
                f"a prompt of {len(request.prompt)} tokens (bucket "
                f"{self.bucket(len(request.prompt))}) and {request.max_tokens} new tokens need "
                f"{need} cache slots; the cache has {self.cache_len}")

    def submit(self, request: Request) -> Request:
        """Queues a request (checked now: one that can never fit is refused here)."""
        self.check(request)
        request.id = next(self._ids) if request.id < 0 else request.id
        self.pending.append(request)
        return request

    def cancel(self, request: Request):
        """Stops a request: its slot is freed before the next chunk (or it leaves the
        queue)."""
        if request.finished:
            return
        request.finish_reason = "cancelled"
        if request in self.pending:
            self.pending.remove(request)
        for s, r in enumerate(self.requests):
            if r is request:
                self.requests[s] = None

    @property
    def active(self) -> int:
        return sum(r is not None for r in self.requests)

    @property
    def idle(self) -> bool:
        return not self.pending and self.active == 0

    def _admit(self, events: List[Event]):
        while self.pending and None in self.requests:
            req = self.pending.popleft()
            slot = self.requests.index(None)
            tokens, mask = left_pad([req.prompt], self.pad_id, self.bucket(len(req.prompt)))
            sampling = (jnp.asarray([req.seed], jnp.int32),
                        jnp.asarray([req.temperature], jnp.float32),
                        jnp.asarray([req.top_k], jnp.int32),
                        jnp.asarray([req.top_p], jnp.float32))
            caches, first = self._prefill(self.params, jnp.asarray(tokens),
                                          jnp.asarray(mask), *sampling)
            self.state = self._insert(self.state, caches, first.token,
                                      jnp.asarray(slot, jnp.int32),
                                      jnp.asarray(not req.ignore_eos),
                                      jnp.asarray(req.max_tokens, jnp.int32),
                                      *(x[0] for x in sampling))
            self.requests[slot] = req
            token, expert = int(first.token[0]), int(first.chosen[0])
            events.append(self._add(slot, [token], [expert]))

    def _add(self, slot: int, tokens: List[int], experts: List[int]) -> Event:
        """Appends a slot's new tokens up to its request's end; frees the slot then."""
        req = self.requests[slot]
        new_t, new_e = [], []
        for t, e in zip(tokens, experts):
            new_t.append(t)
            new_e.append(e)
            if (t in self._eos and not req.ignore_eos) or t in req.stop_ids:
                req.finish_reason = "stop"
            elif len(req.tokens) + len(new_t) >= req.max_tokens:
                req.finish_reason = "length"
            if req.finished:
                break
        req.tokens += new_t
        req.experts += new_e
        if req.finished:
            self.requests[slot] = None
        return Event(req, new_t, new_e, req.finished)

    def step(self) -> List[Event]:
        """Admits what fits, then one decode chunk for every busy slot -> the events."""
        return self.admit() + self.decode()

    def admit(self) -> List[Event]:
        """Prefills waiting requests into free slots -> their first tokens (a server hands
        them out before the chunk: the time to first token is not a chunk longer)."""
        events: List[Event] = []
        self._admit(events)
        return events

    def decode(self) -> List[Event]:
        """One decode chunk for every busy slot -> the events."""
        if self.active == 0:
            return []
        active = jnp.asarray([r is not None for r in self.requests])
        eos_ends = jnp.asarray([r is None or not r.ignore_eos for r in self.requests])
        self.state, recs = self._chunk(self.params, self.state, active, eos_ends)
        return self._events(recs)

    def _events(self, recs) -> List[Event]:
        """The chunk's Record [chunk, S] -> each busy slot's event."""
        tokens, chosen = np.asarray(recs.token), np.asarray(recs.chosen)
        return [self._add(slot, tokens[:, slot].tolist(), chosen[:, slot].tolist())
                for slot, req in enumerate(self.requests) if req is not None]

    def run(self, requests: Sequence[Request]) -> List[Request]:
        """Submits every request and steps until all are finished (offline use, tests)."""
        for r in requests:
            self.submit(r)
        while not self.idle:
            self.step()
        return list(requests)

    def warm_up(self):
        """Compiles every program (each bucket's prefill, insert, the chunk) on a dummy
        request, then empties the slots: the first real request pays no compilation."""
        for width in self.buckets:
            req = Request([self.pad_id] * width, max_tokens=1)
            self.submit(req)
            self._admit([])
            self.cancel(req)
        self.state, _ = self._chunk(self.params, self.state,
                                    jnp.zeros((self.slots,), bool), jnp.ones((self.slots,), bool))
