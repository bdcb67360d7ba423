"""FusionRoute decoding: the router and the experts, fused per token by a decode mode."""

from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp

from fr_jax.inference.core import ChunkedDecoder, DecodeResult
from fr_jax.inference.lazy import LazyExperts, StepState
from fr_jax.inference.sampling import Sampling
from fr_jax.routing.experts import Experts
from fr_jax.routing.fusion import lineup_cfgs, rule_cap
from fr_jax.routing.modes import Mode
from fr_jax.routing.router import Router
from fr_jax.routing.selector import parse_targets
from fr_jax.runtime import sharding as sh
from fr_jax.runtime.errors import ModeError


class FusedDecoder(ChunkedDecoder):
    """FusionRoute decoding: router + experts, fused per token by `mode`.

    The mode's policy (fr_jax/routing/modes.py), chosen once here, says which models run
    and turns their outputs into each next token's distribution. params = {"router": router
    params, "experts": experts params}; only the models the mode needs are run (`expert:i`
    runs expert i alone, `router_only` the router alone).

    Lazy experts (`lazy_experts=True`, modes that use one expert per token; lazy.py): every
    expert reads the prompt, then at each step only the router and the selected expert run.
    An expert that was not selected falls behind; when it is selected again it first reads
    the tokens it missed, then gives the logits for the current position -- all inside the
    jitted scan. The tokens are those of the eager schedule (every expert every step). With
    `return_caches`, the experts that are behind at the end catch up, so every cache holds
    the whole sequence (multi-turn chat reuses them).

    `route_schedule` (profiling and tests) forces the routing weights one-hot on
    route_schedule[i % len] for the i-th generated token (the router still runs).
    """

    def __init__(self, mode: Mode, router: Optional[Router], experts: Optional[Experts],
                 vocab: Optional[int] = None, sampling: Sampling = Sampling(), chunk: int = 16,
                 mesh=None, selector=None, lazy_experts: bool = False, catch_up_width: int = 8,
                 route_schedule: Optional[Sequence[int]] = None):
        super().__init__(sampling, chunk, mesh)
        self._check(mode, router, experts, selector)
        if catch_up_width < 1:
            raise ValueError(f"catch_up_width must be >= 1, got {catch_up_width}")
        self.mode = mode
        self.n_experts = router.n_experts if router is not None else experts.n
        if route_schedule is not None and (
                not route_schedule or not all(0 <= int(k) < self.n_experts for k in route_schedule)):
            raise ValueError(f"route_schedule must list expert indices in 0..{self.n_experts - 1}"
                             f", got {route_schedule}")
        self.route_schedule = None if route_schedule is None else tuple(int(k) for k in route_schedule)
        cfgs = lineup_cfgs(router, experts)
        sizes = [c.vocab_size for c in cfgs]
        self.vocab = vocab or min(sizes)
        if min(sizes) < self.vocab:
            raise ValueError(f"a model has {min(sizes)} logits but the tokenizer has "
                             f"{self.vocab} tokens")
        self.selector = selector if mode.needs_selector else None
        models = ({"selector": self.selector,
                   "targets": parse_targets(self.selector.targets, experts.n)}
                  if self.selector is not None else
                  {"router": router} if mode.routes_per_prompt else {})
        self.policy = mode.policy(self.n_experts, rule_cap(cfgs), **models)
        self.router = router if self.policy.router_per_token else None
        self._prompt_router = mode.routes_per_prompt  # the policy reads the prompt with it
        self.experts = experts if mode.uses_experts else None
        self._full_experts = experts
        if mode.fixed_expert is not None:
            self.experts, _ = experts.subset(mode.fixed_expert)
        self._lazy = None
        if (lazy_experts and self.experts is not None and self.experts.n > 1
                and mode.one_expert_per_token):
            self._lazy = LazyExperts(self.experts, self.vocab, catch_up_width)
        self._finisher = None

    @property
    def lazy(self) -> bool:
        """Lazy experts are on (asked for, and the mode uses one expert per token)."""
        return self._lazy is not None

    @staticmethod
    def _check(mode: Mode, router, experts, selector):
        if mode.standalone:
            raise ModeError(f"mode {mode.name!r} is one stand-alone model: decode it with "
                            "Decoder (the CLI and fr_jax.eval do this)")
        if mode.needs_selector and selector is None:
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
        if mode.fixed_expert is not None and mode.fixed_expert >= experts.n:
            raise ModeError(f"mode {mode.name!r}: there are only {experts.n} experts")

    def prepare(self, params):
        """Keeps only the params the mode runs (expert:i: that expert's slice)."""
        out = {}
        if self.router is not None or self._prompt_router:
            out["router"] = params["router"]
        if self.selector is not None:
            if "selector" not in params:
                raise ModeError("mode 'sequence': params has no 'selector' entry; build it "
                                "with Selector.params(encoder params)")
            out["selector"] = params["selector"]
        if self.experts is not None:
            e = params["experts"]
            if self.mode.fixed_expert is not None:
                _, e = self._full_experts.subset(self.mode.fixed_expert, e)
            out["experts"] = e
        return out

    def generate(self, params, *args, **kwargs) -> DecodeResult:
        return super().generate(self.prepare(params), *args, **kwargs)

    # ---- caches: (router's, experts', per-prompt choice, StepState)
    def _init_caches(self, batch, cache_len):
        rc = self.router.init_cache(batch, cache_len) if self.router is not None else None
        ec = None
        step = StepState(jnp.zeros((batch,), jnp.int32))
        if self._lazy is not None:
            ec, hist, synced = self._lazy.init_caches(batch, cache_len)
            step = StepState(step.t, hist, synced)
        elif self.experts is not None:
            ec = self.experts.init_cache(batch, cache_len)
        seq = None
        width = self.policy.choice_width
        if width is not None:  # the per-prompt choice and its weights / P(correct)
            seq = (jnp.zeros((batch,), jnp.int32), jnp.zeros((batch, width), jnp.float32))
        return (rc, ec, seq, step)

    def _cache_shardings(self, caches):
        rc, ec, seq, step = caches
        if ec is not None:
            ec = (sh.cache_shardings(ec, self.mesh, leading=("expert",))
                  if self.experts.stacked and self._lazy is None
                  else tuple(sh.cache_shardings(c, self.mesh) for c in ec))
        if seq is not None:
            seq = tuple(sh.batch_sharding(self.mesh, x.shape) for x in seq)
        step = jax.tree.map(lambda _: sh.replicated(self.mesh), step)
        return (sh.cache_shardings(rc, self.mesh) if rc is not None else None, ec, seq, step)

    # ---- one step
    def _forced(self, route, index):
        """Routing logits one-hot on route_schedule[index % len] (when a schedule is set);
        index [B]: each row's generated-token count."""
        if self.route_schedule is None:
            return route
        k = jnp.asarray(self.route_schedule, jnp.int32)[index % len(self.route_schedule)]
        return jnp.where(jnp.arange(self.n_experts)[None, :] == k[:, None], 0.0,
                         -1e4).astype(route.dtype) + jnp.zeros_like(route)

    def _logits(self, params, tokens, mask, caches, done=None):
        rc, ec, seq, step = caches
        prefill = mask is not None
        r_logits = route = None
        if self.router is not None:
            r_out, rc = self.router.extend(params["router"], tokens, rc, mask, last_only=True)
            r_logits, route = r_out.logits[:, 0, :self.vocab], r_out.route_logits[:, 0]
            route = self._forced(route, step.t + (0 if prefill else 1))
        if prefill and seq is not None:  # the prompt fixes each row's choice, kept after
            seq = self.policy.choose(params, tokens, mask)
        if self._lazy is not None and not prefill:
            # which expert each row needs is known before any expert runs
            k, with_router = self.policy.selection(route, seq)
            selected, ec, step = self._lazy.step(params["experts"], tokens, done, k, ec, step)
            return self.policy.from_selected(r_logits, route, selected, k, with_router,
                                             seq) + ((rc, ec, seq, step),)
        e_logits = None
        if self._lazy is not None:  # prefill: every expert reads the prompt
            e_logits, ec = self._lazy.prefill(params["experts"], tokens, mask, ec)
        elif self.experts is not None:
            e_logits, ec = self.experts.extend(params["experts"], tokens, ec, mask,
                                               last_only=True)
            e_logits = e_logits[:, :, 0, :self.vocab]  # experts may pad more than the router
        step = step._replace(t=step.t + (0 if prefill else 1))
        return self.policy.combine(r_logits, route, e_logits, seq) + ((rc, ec, seq, step),)

    def _finish(self, params, caches):
        """Lazy experts: the experts that are behind catch up, so every cache holds the
        prompt and every fed token, as after eager decoding."""
        if self._lazy is None:
            return caches
        if self._finisher is None:
            def finish(params, caches):
                rc, ec, seq, step = caches
                ec, step = self._lazy.finish(params["experts"], ec, step)
                return rc, ec, seq, step
            self._finisher = jax.jit(finish)
        return self._finisher(params, caches)
