"""Decoding: left-padded batched prefill, then a jitted `lax.scan` over tokens, in chunks.

    python -m fr_jax.decode                                  # the bundled toy world
    python -m fr_jax.decode --model=/ckpt/Llama-3.2-1B-Instruct --prompt="Hi" --chat

The scan runs `chunk` steps per call and the host stops once every row has emitted an
end-of-sequence id, so short answers do not pay for `max_new_tokens`.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import time
from typing import List, NamedTuple, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from fr_jax import sharding as sh
from fr_jax import trace
from fr_jax.config import decode_mesh, frozen_dtype
from fr_jax.data import encode_prompt
from fr_jax.experts import Experts, load_experts
from fr_jax.fusion import Mode, ModeError, fuse, route_probs, select_expert, sequence_route
from fr_jax.models import CacheOverflowError, Model
from fr_jax.router import Router, load_router
from fr_jax.sampling import Sampling, sample


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

    def row(self, b: int):
        """(token ids, chosen experts) of row b, without the padding after EOS."""
        n = int(self.lengths[b])
        return self.tokens[b, :n].tolist(), self.chosen[b, :n].tolist()


def decode_slots(max_new_tokens: int, chunk: int) -> int:
    """Cache slots decoding needs beyond the prompt: every generated token but the last is
    fed back, in whole chunks of `chunk` scan steps."""
    return -(-(max_new_tokens - 1) // chunk) * chunk


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


class _ChunkedDecoder:
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
        nxt = sample(scores, sub, self.sampling)
        nxt = jnp.where(state.done, pad_id, nxt)
        chosen = jnp.where(state.done, PADDING, chosen)
        done = state.done | jnp.isin(nxt, eos_ids)
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
            state_sh = DecodeState(rows, rows, rep, c_sh)
            rec_sh = Record(rows, rows, sh.batch_sharding(self.mesh, (batch, self.n_experts)))
            chunk_rec = Record(*(sh.NamedSharding(self.mesh, sh.P(None, *r.spec))
                                 for r in rec_sh))
            tok_sh = sh.batch_sharding(self.mesh, (batch, 1))
            fns = (jax.jit(sh.traced_on(self._prefill, self.mesh), donate_argnums=(4,),
                           in_shardings=(p_sh, tok_sh, tok_sh, rep, c_sh, rep, rep),
                           out_shardings=(state_sh, rec_sh)),
                   jax.jit(sh.traced_on(self._chunk, self.mesh), donate_argnums=(1,),
                           in_shardings=(p_sh, state_sh, rep, rep),
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
        args = (params, tok, jax.ShapeDtypeStruct((batch, prompt_len), bool),
                jax.eval_shape(lambda: jax.random.key(0)),
                jax.eval_shape(lambda: self._init_caches(batch, cache_len)),
                jax.ShapeDtypeStruct((n_eos,), jnp.int32), scalar)
        state = jax.eval_shape(self._prefill, *args)[0]
        return (prefill, args), (chunk, (params, state, args[5], scalar))

    def _finish(self, params, caches):
        """The caches handed back to a caller that asked for them (e.g. a multi-turn chat)."""
        return caches

    def _place_caches(self, caches):
        if self.mesh is None:
            return caches
        return jax.device_put(caches, self._cache_shardings(caches))

    def generate(self, params, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                 eos_ids: Sequence[int], pad_id: int = 0, seed: int = 0,
                 cache_len: Optional[int] = None, width: int = 0,
                 return_caches: bool = False) -> DecodeResult:
        """Decodes a batch of token-id prompts (ragged; left-padded here to at least
        `width`, so batches of one padded width share one compiled prefill)."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        tokens, mask = left_pad(prompts, pad_id, width)
        b, t = tokens.shape
        need = t + decode_slots(max_new_tokens, self.chunk)
        cache_len = cache_len or need
        if need > cache_len:
            raise CacheOverflowError(
                f"prompt of {t} tokens + {max_new_tokens} new tokens (rounded to chunks of "
                f"{self.chunk}) need {need} cache slots but the cache has {cache_len}; "
                f"raise cache_len, lower max_new_tokens, or truncate the prompt")
        eos = jnp.asarray(sorted(set(eos_ids)) or [-1], jnp.int32)
        pad = jnp.asarray(pad_id, jnp.int32)
        prefill, chunk = self._compiled(params, b, cache_len)

        t0 = time.perf_counter()
        caches = self._place_caches(self._init_caches(b, cache_len))
        state, first = prefill(params, jnp.asarray(tokens), jnp.asarray(mask),
                               jax.random.key(seed), caches, eos, pad)
        records = [jax.tree.map(lambda x: np.asarray(x)[:, None], first)]
        t1 = time.perf_counter()
        steps = 0
        while steps + 1 < max_new_tokens and not bool(np.all(np.asarray(state.done))):
            state, recs = chunk(params, state, eos, pad)
            records.append(jax.tree.map(lambda x: np.swapaxes(np.asarray(x), 0, 1), recs))
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


class Decoder(_ChunkedDecoder):
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


LAZY_KINDS = ("fusionroute", "expert_only", "sequence_head", "sequence")  # one expert a token


class StepState(NamedTuple):
    """FusedDecoder's carry besides the KV caches. t: tokens fed since the prompt (scalar).
    With lazy experts, hist [B, H]: those tokens; synced [n, B]: how many of them each
    expert's cache holds (an expert not selected falls behind until it is selected again)."""

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


class FusedDecoder(_ChunkedDecoder):
    """FusionRoute decoding: router + experts, fused per token by `mode` (see fusion.py).

    params = {"router": router params, "experts": experts params}; only the models the
    mode needs are run (`expert:i` runs expert i alone, `router_only` the router alone).

    Lazy experts (`lazy_experts=True`, modes that use one expert per token): every expert
    reads the prompt, then at each step only the router and the selected expert run. An
    expert that was not selected falls behind; when it is selected again it first reads
    the tokens it missed (in chunks of `catch_up_width`; the last chunk rounded up to a power
    of two), then gives the logits for the current position -- all inside the jitted scan,
    each expert behind a `lax.cond` that skips it when no row of the batch selected it. A
    running expert brings every active row up to date (see `_expert_turn`). The tokens are
    those of the eager schedule (every expert every step). With `return_caches`,
    the experts that are behind at the end catch up, so every cache holds the whole
    sequence (multi-turn chat reuses them).

    `route_schedule` (profiling and tests) forces the routing weights one-hot on
    route_schedule[i % len] for the i-th generated token (the router still runs).
    """

    def __init__(self, mode: Mode, router: Optional[Router], experts: Optional[Experts],
                 vocab: Optional[int] = None, sampling: Sampling = Sampling(), chunk: int = 16,
                 mesh=None, selector=None, lazy_experts: bool = False, catch_up_width: int = 8,
                 route_schedule: Optional[Sequence[int]] = None):
        super().__init__(sampling, chunk, mesh)
        if mode.kind == "model":
            raise ModeError(f"mode {mode.name!r} is one stand-alone model: decode it with "
                            "Decoder (the CLI and fr_jax.eval do this)")
        if mode.kind == "sequence" and selector is None:
            raise ModeError("mode 'sequence' needs a trained SharedTrunkNet (train one with "
                            "`python -m fr_jax.seqroute`, set --config.seqroute.path); "
                            "'sequence:head' routes per prompt with the router's head alone")
        if mode.uses_router and router is None:
            raise ModeError(f"mode {mode.name!r} needs a router")
        if mode.uses_experts and experts is None:
            raise ModeError(f"mode {mode.name!r} needs experts")
        if router is not None and experts is not None and router.n_experts != experts.n:
            raise ModeError(f"the router's routing head has {router.n_experts} outputs but "
                            f"{experts.n} experts were given")
        if mode.kind == "expert" and mode.expert >= experts.n:
            raise ModeError(f"mode {mode.name!r}: there are only {experts.n} experts")
        if catch_up_width < 1:
            raise ValueError(f"catch_up_width must be >= 1, got {catch_up_width}")
        self.mode = mode
        self.n_experts = router.n_experts if router is not None else experts.n
        if route_schedule is not None and (
                not route_schedule or not all(0 <= int(k) < self.n_experts for k in route_schedule)):
            raise ValueError(f"route_schedule must list expert indices in 0..{self.n_experts - 1}"
                             f", got {route_schedule}")
        self.route_schedule = None if route_schedule is None else tuple(int(k) for k in route_schedule)
        sizes = ([router.cfg.vocab_size] if router is not None else []) + (
            [c.vocab_size for c in experts.cfgs] if experts is not None else [])
        self.vocab = vocab or min(sizes)
        if min(sizes) < self.vocab:
            raise ValueError(f"a model has {min(sizes)} logits but the tokenizer has "
                             f"{self.vocab} tokens")
        self.selector = selector if mode.kind == "sequence" else None
        self.targets = []
        if self.selector is not None:
            from fr_jax.baselines.seqroute import parse_targets
            self.targets = parse_targets(self.selector.targets, experts.n)
        fused_target = any(t.kind == "fusionroute" for t in self.targets)
        self.router = router if (mode.routes_per_token or fused_target) else None
        self._seq_router = router if mode.kind == "sequence_head" else None
        self.experts = experts if mode.uses_experts else None
        self._full_experts = experts
        if mode.kind == "expert":
            self.experts, _ = experts.subset(mode.expert)
        self.lazy = bool(lazy_experts and self.experts is not None and self.experts.n > 1
                         and mode.kind in LAZY_KINDS)
        self.width = catch_up_width
        self.widths = catch_up_widths(catch_up_width)
        self._finisher = None

    def prepare(self, params):
        """Keeps only the params the mode runs (expert:i: that expert's slice)."""
        out = {}
        if self.router is not None or self._seq_router is not None:
            out["router"] = params["router"]
        if self.selector is not None:
            if "selector" not in params:
                raise ModeError("mode 'sequence': params has no 'selector' entry; build it "
                                "with Selector.params(encoder params)")
            out["selector"] = params["selector"]
        if self.experts is not None:
            e = params["experts"]
            if self.mode.kind == "expert":
                _, e = self._full_experts.subset(self.mode.expert, e)
            out["experts"] = e
        return out

    def generate(self, params, *args, **kwargs) -> DecodeResult:
        return super().generate(self.prepare(params), *args, **kwargs)

    # ---- caches
    def _init_caches(self, batch, cache_len):
        rc = self.router.init_cache(batch, cache_len) if self.router is not None else None
        ec = None
        step = StepState(jnp.zeros((), jnp.int32))
        if self.lazy:  # one cache per expert, with a chunk's width of spare slots
            n = self.experts.n
            ec = tuple(self.experts.model(e).init_cache(batch, cache_len + self.width)
                       for e in range(n))
            step = StepState(step.t, jnp.zeros((batch, cache_len), jnp.int32),
                             jnp.zeros((n, batch), jnp.int32))
        elif self.experts is not None:
            ec = self.experts.init_cache(batch, cache_len)
        seq = None
        if self._seq_router is not None:  # the per-prompt choice and its averaged weights
            seq = (jnp.zeros((batch,), jnp.int32), jnp.zeros((batch, self.n_experts), jnp.float32))
        if self.selector is not None:  # the per-prompt target and its P(correct) per target
            seq = (jnp.zeros((batch,), jnp.int32),
                   jnp.zeros((batch, len(self.targets)), jnp.float32))
        return (rc, ec, seq, step)

    def _cache_shardings(self, caches):
        rc, ec, seq, step = caches
        if ec is not None:
            ec = (sh.cache_shardings(ec, self.mesh, leading=("expert",))
                  if self.experts.stacked and not self.lazy
                  else tuple(sh.cache_shardings(c, self.mesh) for c in ec))
        if seq is not None:
            seq = tuple(sh.batch_sharding(self.mesh, x.shape) for x in seq)
        step = jax.tree.map(lambda _: sh.replicated(self.mesh), step)
        return (sh.cache_shardings(rc, self.mesh) if rc is not None else None, ec, seq, step)

    # ---- one step
    def _forced(self, route, index):
        """Routing logits one-hot on route_schedule[index % len] (when a schedule is set)."""
        if self.route_schedule is None:
            return route
        k = jnp.asarray(self.route_schedule, jnp.int32)[index % len(self.route_schedule)]
        return jnp.where(jnp.arange(self.n_experts) == k, 0.0, -1e4).astype(route.dtype) + \
            jnp.zeros_like(route)

    def _sequence_choice(self, params, tokens, mask, seq):
        """At prefill: the router reads the prompt once (no cache) and fixes each row's expert;
        afterwards the stored choice is reused."""
        if mask is None:
            return seq
        positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0).astype(jnp.int32)
        out = self._seq_router.forward(params["router"], tokens, positions,
                                       mask.astype(jnp.int32))
        return sequence_route(out.route_logits, mask)

    def _targets_logits(self, r_logits, route, e_logits, target):
        """Every target's next-token log-probs, then each row's own target's [B, V] (with
        the expert that produced the token, and routing weights where FusionRoute ran)."""
        b = e_logits.shape[1]
        lps, chosen, probs = [], [], jnp.zeros((b, self.n_experts), jnp.float32)
        for t in self.targets:
            f = fuse(t, r_logits, route, e_logits[t.expert:t.expert + 1] if t.kind == "expert"
                     else e_logits)
            lps.append(f.logprobs)
            chosen.append(f.chosen)
            if f.route_probs is not None:
                probs = jnp.where((target == len(lps) - 1)[:, None], f.route_probs, probs)
        pick = lambda x: jnp.take_along_axis(jnp.stack(x), target[None, :, None], axis=0)[0]
        return pick(lps), pick([c[:, None] for c in chosen])[:, 0], probs

    def _logits(self, params, tokens, mask, caches, done=None):
        rc, ec, seq, step = caches
        r_logits = route = None
        if self.router is not None:
            r_out, rc = self.router.extend(params["router"], tokens, rc, mask, last_only=True)
            r_logits, route = r_out.logits[:, 0, :self.vocab], r_out.route_logits[:, 0]
            route = self._forced(route, step.t + (0 if mask is not None else 1))
        if self.mode.kind == "sequence" and mask is not None:
            # prefill: the SharedTrunkNet picks each row's target once
            seq = self.selector.choose(params["selector"], tokens, mask)
        if self.mode.kind == "sequence_head":
            seq = self._sequence_choice(params, tokens, mask, seq)
        if self.lazy and mask is None:
            return self._lazy_step(params, tokens, done, r_logits, route, rc, ec, seq, step)
        e_logits = None
        if self.lazy:  # prefill: every expert reads the prompt
            outs = [self.experts.model(e).extend(self.experts.params_of(params["experts"], e),
                                                 tokens, ec[e], mask, last_only=True)
                    for e in range(self.experts.n)]
            ec = tuple(c for _, c in outs)
            e_logits = jnp.stack([o.logits[:, 0, :self.vocab] for o, _ in outs])
        elif self.experts is not None:
            e_logits, ec = self.experts.extend(params["experts"], tokens, ec, mask,
                                               last_only=True)
            e_logits = e_logits[:, :, 0, :self.vocab]  # experts may pad more than the router
        step = step._replace(t=step.t + (0 if mask is not None else 1))
        if self.mode.kind == "sequence_head":
            logprobs = jax.nn.log_softmax(select_expert(e_logits, seq[0]).astype(jnp.float32), -1)
            return logprobs, seq[0], seq[1], (rc, ec, seq, step)
        if self.mode.kind == "sequence":
            logprobs, chosen, probs = self._targets_logits(r_logits, route, e_logits, seq[0])
            return logprobs, chosen, probs, (rc, ec, seq, step)
        fused = fuse(self.mode, r_logits, route, e_logits)
        probs = fused.route_probs
        if probs is None:
            probs = jnp.zeros((tokens.shape[0], self.n_experts), jnp.float32)
        return fused.logprobs, fused.chosen, probs, (rc, ec, seq, step)

    # ---- lazy experts
    def _selection(self, route, seq):
        """Each row's expert for this token [B], and whether the router's logits join it
        [B] (FusionRoute) -- known before any expert runs."""
        argmax = (lambda: jnp.argmax(route_probs(route), axis=-1).astype(jnp.int32))
        kind = self.mode.kind
        if kind in ("fusionroute", "expert_only"):
            k = argmax()
            return k, jnp.full(k.shape, kind == "fusionroute")
        if kind == "sequence_head":
            return seq[0], jnp.zeros(seq[0].shape, bool)
        # sequence: each row's target is an expert alone or FusionRoute
        fused = jnp.asarray([t.kind == "fusionroute" for t in self.targets])[seq[0]]
        fixed = jnp.asarray([t.expert if t.kind == "expert" else 0 for t in self.targets],
                            jnp.int32)[seq[0]]
        return (jnp.where(fused, argmax(), fixed) if route is not None else fixed), fused

    def _lazy_step(self, params, tokens, done, r_logits, route, rc, ec, seq, step):
        """One decode step that runs only the selected experts (see the class docstring)."""
        b = tokens.shape[0]
        hist = jax.lax.dynamic_update_slice(step.hist, tokens[:, :1], (0, step.t))
        k, fused_rows = self._selection(route, seq)
        active = jnp.ones((b,), bool) if done is None else jnp.logical_not(done)
        selected = jnp.zeros((b, self.vocab), jnp.float32)
        caches, synced = [], []
        for e in range(self.experts.n):
            need = (k == e) & active
            # The expert's params are taken inside its branch: a skipped expert reads nothing.
            run = functools.partial(self._expert_turn, e, params["experts"], hist, active,
                                    step.t)
            skip = lambda cache, s: (cache, jnp.zeros((b, self.vocab), jnp.float32), s)
            cache, logits, s = jax.lax.cond(jnp.any(need), run, skip, ec[e], step.synced[e])
            selected = jnp.where(need[:, None], logits, selected)
            caches.append(cache)
            synced.append(s)
        step = StepState(step.t + 1, hist, jnp.stack(synced))
        return self._assemble(r_logits, route, selected, k, fused_rows, seq,
                              (rc, tuple(caches), seq, step))

    def _assemble(self, r_logits, route, selected, k, fused_rows, seq, caches):
        """The step's outputs from the selected experts' logits [B, V] (the same operations
        as `fuse` on all experts' logits, so the tokens are the eager ones)."""
        b = selected.shape[0]
        lsm = lambda x: jax.nn.log_softmax(x.astype(jnp.float32), axis=-1)
        alone = lsm(selected)
        kind = self.mode.kind
        if kind == "sequence_head":
            return alone, seq[0], seq[1], caches
        w = route_probs(route) if route is not None else jnp.zeros((b, self.n_experts))
        if kind == "expert_only":
            return alone, k, w, caches
        fused = lsm(lsm(r_logits) + alone) if r_logits is not None else alone
        if kind == "fusionroute":
            return fused, k, w, caches
        return (jnp.where(fused_rows[:, None], fused, alone), k,
                jnp.where(fused_rows[:, None], w, 0.0), caches)

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

    def _expert_turn(self, e, group_params, hist, active, t, cache, synced):
        """Expert e, selected by some row: every active row reads the tokens it missed and
        the current one (hist[synced : t + 1]) -> (cache, logits [B, V] of the current
        position, synced). Rows that did not select it catch up too, at no extra weight
        reads: the expert then stays in step with the whole batch while it is in use, so a
        large batch with mixed routing reads one-token chunks as eager decoding would,
        instead of chunks as wide as the longest gap of any row."""
        model = self.experts.model(e)
        p = self.experts.params_of(group_params, e)
        n_miss = jnp.where(active, t + 1 - synced, 0)
        cache, synced, n_miss = self._catch_up_long(model, p, hist, cache, synced, n_miss)

        def last_chunk(width):
            def run(cache):
                out, cache = model.catch_up(p, self._gather(hist, synced, width), n_miss, cache)
                return cache, out.logits[:, 0, :self.vocab]
            return run

        widths = jnp.asarray(self.widths, jnp.int32)
        branch = jnp.searchsorted(widths, jnp.max(n_miss)).astype(jnp.int32)
        cache, logits = jax.lax.switch(branch, [last_chunk(w) for w in self.widths], cache)
        return cache, logits, jnp.where(active, t + 1, synced)

    def _finish(self, params, caches):
        """Lazy experts: every expert catches up on the tokens it has not read, so each cache
        holds the prompt and every fed token, as after eager decoding."""
        if not self.lazy:
            return caches
        if self._finisher is None:
            def finish(params, caches):
                rc, ec, seq, step = caches
                out, synced = [], []
                for e in range(self.experts.n):
                    model = self.experts.model(e)
                    p = self.experts.params_of(params["experts"], e)
                    n_miss = step.t - step.synced[e]
                    cache, s, n_miss = self._catch_up_long(model, p, step.hist, ec[e],
                                                           step.synced[e], n_miss)
                    _, cache = model.catch_up(p, self._gather(step.hist, s, self.width),
                                              n_miss, cache)
                    out.append(cache)
                    synced.append(s + n_miss)
                return rc, tuple(out), seq, step._replace(synced=jnp.stack(synced))
            self._finisher = jax.jit(finish)
        return self._finisher(params, caches)


# ---------------------------------------------------------------------------- CLI
def read_prompts(path: str) -> List[str]:
    """Prompts from a JSONL file with a string "prompt" field on every line."""
    import json
    import os

    if not os.path.isfile(path):
        raise SystemExit(f"prompts file {path!r} not found (expected JSONL, one "
                         '{"prompt": "..."} object per line)')
    prompts = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise SystemExit(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str):
                raise SystemExit(f'{path}:{n}: expected an object with a string "prompt" field')
            prompts.append(rec["prompt"])
    if not prompts:
        raise SystemExit(f"prompts file {path!r} has no prompts")
    return prompts


def check_tokenizers(named: Sequence[Tuple[str, object]]):
    """All (path, tokenizer) pairs must be one tokenizer: FusionRoute adds logits per id."""
    ref_path, ref = named[0]
    ref_vocab = ref.get_vocab()
    for path, tok in named[1:]:
        vocab = tok.get_vocab()
        if vocab != ref_vocab:
            diff = sum(1 for k, v in vocab.items() if ref_vocab.get(k) != v)
            raise SystemExit(
                f"tokenizer mismatch: {path} ({len(vocab)} tokens) differs from {ref_path} "
                f"({len(ref_vocab)} tokens) in {diff + abs(len(ref_vocab) - len(vocab))} "
                "entries; the router and every expert must share one tokenizer (same family)")


def experts_layout(config) -> Optional[bool]:
    """config.experts.stacked -> the `stacked` argument of load_experts (auto: the list
    layout, which decoding reads in place; see config.py)."""
    return {"auto": False, "yes": True, "no": False}[config.experts.stacked]


def load_world(config, mode: Mode, mesh):
    """Loads what `mode` needs onto `mesh`: (router | None, experts | None, params,
    tokenizer, expert names, model configs, SharedTrunkNet selector | None)."""
    import os

    from fr_jax.hf import load_config, load_tokenizer
    from fr_jax.toy.demo import bundled_world

    router_path, expert_paths = config.router.path, list(config.experts.paths)
    if mode.kind == "model":
        return load_standalone(config, mode, mesh)
    if not router_path and not expert_paths:  # the trained toy world shipped in the package
        world = bundled_world()
        router_path, expert_paths = world["router"], world["experts"]
    for p in ([router_path] if router_path else []) + expert_paths:
        load_config(p)  # a missing/odd folder fails here, before anything heavy is read
    if mode.uses_router and not router_path:
        raise SystemExit(f"mode {mode.name!r} needs a router: set --config.router.path")
    if mode.uses_experts and not expert_paths:
        raise SystemExit(f"mode {mode.name!r} needs experts: set --config.experts.paths")
    if mode.kind == "expert" and mode.expert >= len(expert_paths):
        raise SystemExit(f"mode {mode.name!r}: only {len(expert_paths)} experts are configured")

    used = ([router_path] if mode.uses_router else []) + (expert_paths if mode.uses_experts else [])
    toks = [(p, load_tokenizer(p)) for p in used]
    check_tokenizers(toks)
    tokenizer = toks[0][1]
    dtype, pdtype = config.model.dtype, frozen_dtype(config)  # decoding updates nothing
    stacked = experts_layout(config)
    router = experts = None
    params = {}
    if mode.uses_router:
        router, params["router"] = load_router(
            router_path, n_experts=len(expert_paths) or None, seed=config.router.seed,
            dtype=dtype, param_dtype=pdtype, shardings_fn=lambda r: sh.param_shardings(r, mesh))
    if mode.uses_experts:
        experts, params["experts"] = load_experts(
            expert_paths, dtype, pdtype, vocab=len(tokenizer), stacked=stacked,
            shardings_fn=lambda e: sh.param_shardings(e, mesh))
    names = list(config.experts.names) or [os.path.basename(os.path.normpath(p))
                                           for p in expert_paths]
    cfgs = ([router.cfg] if router else []) + (list(experts.cfgs) if experts else [])
    too_small = [c for c in cfgs if c.vocab_size < len(tokenizer)]
    if too_small:
        raise SystemExit(f"the tokenizer has {len(tokenizer)} tokens but a model has only "
                         f"{too_small[0].vocab_size} logits: the tokenizer is from another model")
    selector = None
    if mode.kind == "sequence":
        selector, params["selector"] = _selector(config, router, params, mesh)
    return router, experts, params, tokenizer, names, cfgs, selector


def _selector(config, router, params, mesh):
    """(Selector, its params) for mode `sequence`: the SharedTrunkNet folder from
    config.seqroute.path (default: the bundled world's) on the encoder it was trained on."""
    import os

    from fr_jax.baselines.seqroute import load_selector, read_meta
    from fr_jax.hf import load_hf
    from fr_jax.toy.demo import bundled_world

    path = config.seqroute.path or bundled_world()["seqroute"]
    if not os.path.isdir(path):
        raise SystemExit(f"mode 'sequence': no SharedTrunkNet at {path!r}; train one with "
                         "`python -m fr_jax.seqroute` and set --config.seqroute.path")
    meta = read_meta(path)
    encoder = config.seqroute.encoder or meta["encoder"]
    if encoder == "router":
        enc_cfg, enc_params = router.cfg, params["router"]["backbone"]
    else:
        enc_cfg, enc_params = load_hf(encoder, config.model.dtype, frozen_dtype(config))
    return load_selector(path, enc_cfg, enc_params, config.seqroute.lam, mesh)


def load_standalone(config, mode: Mode, mesh):
    """A stand-alone baseline model (modes `merged`, `finetuned`) from config.baselines,
    default the bundled world's, as load_world's tuple with params {"model": params}."""
    import os

    from fr_jax.hf import load_hf, load_tokenizer
    from fr_jax.toy.demo import bundled_world

    path = getattr(config.baselines, mode.model) or bundled_world()[mode.model]
    if not os.path.isfile(os.path.join(path, "config.json")):
        how = {"merged": "`python -m fr_jax.merge`",
               "finetuned": "`python -m fr_jax.train` with --config.train.stages=lm"}[mode.model]
        raise SystemExit(f"mode {mode.name!r}: no model at {path!r}; write one with {how} "
                         f"and set --config.baselines.{mode.model}")
    cfg, params = load_hf(path, config.model.dtype, frozen_dtype(config))
    model = Model(cfg)
    params = jax.device_put(params, sh.param_shardings(model, mesh))
    return None, None, {"model": params}, load_tokenizer(path), [mode.model], [cfg], None


def run(config) -> DecodeResult:
    """Decodes the configured prompts with the configured mode; prints the coloured trace,
    writes JSONL / HTML if asked. Returns the DecodeResult."""
    import json
    import sys as _sys


    d = config.decode
    mode = Mode.parse(d.mode, len(config.experts.paths) or None)
    mesh = sh.mesh_from_config(decode_mesh(config))
    router, experts, params, tok, names, cfgs, selector = load_world(config, mode, mesh)
    prompts = read_prompts(d.prompts_file) if d.prompts_file else list(d.prompts)
    ids = [encode_prompt(tok, p, d.chat) for p in prompts]

    if d.cache_len:
        room = d.cache_len - decode_slots(d.max_new_tokens, d.chunk)
        too_long = [i for i, x in enumerate(ids) if len(x) > room]
        if too_long and not d.truncate_prompt:
            raise SystemExit(
                f"prompt {too_long[0]} has {len(ids[too_long[0]])} tokens but the cache "
                f"({d.cache_len} slots) leaves room for {room} after {d.max_new_tokens} new "
                "tokens; raise decode.cache_len, lower decode.max_new_tokens, or set "
                "decode.truncate_prompt=True to keep each prompt's last tokens")
        if room < 1:
            raise SystemExit(f"decode.cache_len={d.cache_len} cannot hold {d.max_new_tokens} "
                             "new tokens")
        ids = [x[-room:] for x in ids]
    eos = set(d.eos_ids) or set().union(*(c.eos_token_ids for c in cfgs))
    if not d.eos_ids and tok.eos_token_id is not None:
        eos.add(tok.eos_token_id)
    pad = tok.pad_token_id if tok.pad_token_id is not None else (cfgs[0].pad_token_id or 0)

    sampling = Sampling(d.temperature, d.top_k, d.top_p)
    if mode.kind == "model":
        decoder = Decoder(Model(cfgs[0]), sampling, d.chunk, mesh)
        params = params["model"]
        print(f"mode {mode.name}: one stand-alone model; mesh {dict(mesh.shape)} on "
              f"{jax.devices()[0].platform}")
    else:
        decoder = FusedDecoder(mode, router, experts, vocab=len(tok), sampling=sampling,
                               chunk=d.chunk, mesh=mesh, selector=selector,
                               lazy_experts=d.lazy_experts, catch_up_width=d.catch_up_width)
        print(f"mode {mode.name}: router {config.router.path or '(the bundled toy world)'}; "
              f"experts {', '.join(names)}; mesh {dict(mesh.shape)} on "
              f"{jax.devices()[0].platform}")
    res = decoder.generate(params, ids, d.max_new_tokens, sorted(eos), pad, seed=d.seed,
                           cache_len=d.cache_len or None)

    colour = _sys.stdout.isatty()
    records, html_rows, chosen_rows = [], [], []
    for row, prompt in enumerate(prompts):
        new, chosen = res.row(row)
        pieces = [tok.decode([t]) for t in new]
        chosen_rows.append(chosen)
        print(f"\n[{row}] {prompt}")
        print(trace.render_terminal(pieces, chosen, names) if colour
              else trace.render_text(pieces, chosen, names))
        records.append({"prompt": prompt, "mode": mode.name,
                        "text": tok.decode(new, skip_special_tokens=True), "token_ids": new,
                        "experts": chosen, "expert_names": names})
        html_rows.append({"prompt": prompt, "pieces": pieces, "chosen": chosen,
                          "probs": res.route_probs[row, :len(new)].round(3).tolist()
                          if mode.uses_router else None})
    if colour:
        print("\n" + trace.legend_terminal(names))
    n_tok = int(res.lengths.sum())
    print(trace.summary(chosen_rows, names, n_tok, res.seconds_decode + res.seconds_prefill))
    if d.output:
        with open(d.output, "w") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
        print(f"wrote {len(records)} records to {d.output}")
    if d.trace_html:
        with open(d.trace_html, "w") as f:
            f.write(trace.render_html(html_rows, names, mode=mode.name))
        print(f"wrote routing trace to {d.trace_html}")
    return res


def main(argv=None):
    from absl import flags

    from fr_jax.config import default_config_file, parse_flags
    from fr_jax.hf import CheckpointError
    from fr_jax.models import ConfigError

    shortcuts = {  # flag -> config field it sets
        "mode": "mode", "prompts_file": "prompts_file", "output": "output",
        "trace_html": "trace_html"}

    def extra(fv):
        flags.DEFINE_multi_string("prompt", None, "prompt text, repeat for a batch "
                                  "(overrides config.decode.prompts)", flag_values=fv)
        flags.DEFINE_string("mode", None, "decode mode (sets config.decode.mode)", flag_values=fv)
        flags.DEFINE_string("prompts_file", None, "JSONL prompts (sets config.decode.prompts_file)",
                            flag_values=fv)
        flags.DEFINE_string("output", None, "JSONL output (sets config.decode.output)",
                            flag_values=fv)
        flags.DEFINE_string("trace_html", None, "HTML routing trace (sets config.decode.trace_html)",
                            flag_values=fv)

    argv = list(sys.argv[1:] if argv is None else argv)
    fv = parse_flags(["fr_jax.decode"] + argv, default_config_file("tiny.py"), extra)
    config = fv.config
    with config.unlocked():
        if fv.prompt:
            config.decode.prompts = tuple(fv.prompt)
        for flag, field in shortcuts.items():
            if fv[flag].value is not None:
                setattr(config.decode, field, fv[flag].value)
    try:
        return run(config)
    except (CheckpointError, ConfigError, CacheOverflowError, ModeError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
