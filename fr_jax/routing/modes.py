"""Decode modes as policies: which models a mode runs, and how their outputs become the
next-token distribution.

A mode's name parses into a `Mode` (data); its policy class says which models it needs, and
one policy object, built once per decoder (`Mode.policy`), turns the models' outputs into
the next token's log-probs. `fr_jax.inference.FusedDecoder` asks the policy, never the
mode's name, inside its jitted scan and its lazy-experts schedule.

| name           | next-token distribution                                  | chosen expert   |
| -------------- | -------------------------------------------------------- | --------------- |
| `fusionroute`  | softmax(router logits + logits of expert k), k = argmax w | k               |
| `expert_only`  | softmax(logits of expert k), k = argmax w                 | k               |
| `router_only`  | softmax(router logits)                                    | -1 (the router) |
| `expert:i`     | softmax(logits of expert i)                               | i               |
| `mixture`      | sum_i w_i softmax(logits of expert i)                     | argmax w        |
| `sequence`     | that of target t, t fixed per prompt by a SharedTrunkNet  | t's             |
| `sequence:head`| softmax(logits of expert s), s fixed per prompt           | s               |
| `merged`, `finetuned` | one stand-alone model (a baseline), no router      | 0               |

`sequence` is sequence-level routing on prefill activations (fr_jax/routing/selector.py):
a SharedTrunkNet reads the encoder's pooled activations of the prompt and picks a target --
an expert alone or FusionRoute itself -- which then decodes the whole answer.
`sequence:head` is the simplest sequence-level router: s = argmax of the router's routing
weights averaged over the prompt's tokens (the router reads the prompt once).
`merged` and `finetuned` name single models (fr_jax/baselines/merging.py, train stage `lm`);
they are decoded by the plain `Decoder`, not fused. The rule each policy applies is one of
fusion.py's functions.

Every policy gives, for a batch of B rows, n experts and V tokens:
- `combine(r_logits [B, V], route [B, n], e_logits [n', B, V], seq)` -> (log-probs [B, V],
  chosen expert [B] int32, routing weights [B, n]): the eager rule, every run model's logits
  at hand (n' = 1 for `expert:i`, whose decoder runs that expert alone);
- `selection(route, seq)` -> (each row's expert [B], whether the router's logits join it)
  and `from_selected(r_logits, route, selected [B, V], k, with_router, seq)`: the same rule
  split for lazy experts, the expert each row needs known before any expert runs;
- `choose(params, tokens, mask)`: what the prompt fixes at prefill (the sequence modes), a
  choice [B] and its weights [B, choice_width].
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import jax
import jax.numpy as jnp

from fr_jax.routing.fusion import (ROUTER, log_softmax, next_token_logprobs, route_probs,
                                   select_expert, sequence_route)
from fr_jax.runtime.errors import ModeError

MODES = ("fusionroute", "expert_only", "router_only", "expert:<i>", "mixture", "sequence",
         "sequence:head", "merged", "finetuned")
STANDALONE = ("merged", "finetuned")  # baselines that are one plain model


class Policy:
    """A decode mode's policy. The class attributes say which models it runs; an instance
    (one per decoder) applies its rule to their outputs."""
    uses_router = True  # the router's params are needed
    routes_per_token = True  # the router runs at every step
    uses_experts = True
    needs_all_experts = True
    one_expert_per_token = False  # each token from one selected expert: lazy experts apply
    chooses_per_prompt = False  # the prompt fixes what decodes each row
    routes_per_prompt = False  # ... read once by the router's head (`sequence:head`)
    needs_selector = False  # ... by a SharedTrunkNet (`sequence`)
    adds_router_logits = False  # the router's complementary logits join the expert's
    standalone = False  # one plain baseline model: decoded by `Decoder`, not fused
    cap = None  # the soft-cap the rule applies (fusion.softcap=sum: raw logits), see fusion.py

    def __init__(self, mode: "Mode", n_experts: int):
        self.mode, self.n_experts = mode, n_experts

    @property
    def router_per_token(self) -> bool:
        """The router runs at every step of this decoder."""
        return self.routes_per_token

    @property
    def choice_width(self) -> Optional[int]:
        """Width of the per-prompt weights (None: the prompt fixes nothing)."""
        return None

    def _no_weights(self, b: int):
        return jnp.zeros((b, self.n_experts), jnp.float32)

    def choose(self, params, tokens, mask):
        raise ModeError(f"mode {self.mode.name!r} fixes nothing per prompt")

    def combine(self, r_logits, route, e_logits, seq):
        raise NotImplementedError

    def selection(self, route, seq):
        raise ModeError(f"mode {self.mode.name!r} does not select one expert per token")

    def from_selected(self, r_logits, route, selected, k, with_router, seq):
        raise ModeError(f"mode {self.mode.name!r} does not select one expert per token")


class SelectedExpert(Policy):
    """`fusionroute` and `expert_only`: k = argmax of the routing weights at every token; the
    selected expert's logits, with the router's complementary logits for `fusionroute`."""
    one_expert_per_token = True

    def __init__(self, mode, n_experts):
        super().__init__(mode, n_experts)
        self.with_router = type(self).adds_router_logits

    def combine(self, r_logits, route, e_logits, seq):
        w = route_probs(route)
        k = jnp.argmax(w, axis=-1).astype(jnp.int32)
        selected = select_expert(e_logits, k)
        return next_token_logprobs(r_logits if self.with_router else None, selected,
                                   cap=self.cap), k, w

    def selection(self, route, seq):
        return jnp.argmax(route_probs(route), axis=-1).astype(jnp.int32), self.with_router

    def from_selected(self, r_logits, route, selected, k, with_router, seq):
        return next_token_logprobs(r_logits, selected, with_router, self.cap), k, route_probs(route)


class FusionRoute(SelectedExpert):
    adds_router_logits = True


class ExpertOnly(SelectedExpert):
    pass


class RouterOnly(Policy):
    """`router_only`: the router's own logits; no expert runs."""
    uses_experts = needs_all_experts = False

    def combine(self, r_logits, route, e_logits, seq):
        b = r_logits.shape[0]
        return log_softmax(r_logits, self.cap), jnp.full((b,), ROUTER, jnp.int32), route_probs(route)


class FixedExpert(Policy):
    """`expert:i`: expert i alone (its decoder runs no other model)."""
    uses_router = routes_per_token = needs_all_experts = False

    def combine(self, r_logits, route, e_logits, seq):
        b = e_logits.shape[1]
        return (log_softmax(e_logits[0], self.cap), jnp.full((b,), self.mode.expert, jnp.int32),
                self._no_weights(b))


class Mixture(Policy):
    """`mixture`: the experts' distributions weighted by the routing weights."""

    def combine(self, r_logits, route, e_logits, seq):
        w = route_probs(route)
        k = jnp.argmax(w, axis=-1).astype(jnp.int32)
        lp = log_softmax(e_logits, self.cap)
        mix = jax.nn.logsumexp(jnp.log(w).T[:, :, None] + lp, axis=0)
        return mix, k, w


class SequenceHead(Policy):
    """`sequence:head`: the router reads the prompt once (no cache) and its averaged routing
    weights pick the expert that decodes the whole answer."""
    routes_per_token = False
    one_expert_per_token = chooses_per_prompt = routes_per_prompt = True

    def __init__(self, mode, n_experts, router=None):
        super().__init__(mode, n_experts)
        self.router = router

    @property
    def choice_width(self):
        return self.n_experts

    def choose(self, params, tokens, mask):
        positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0).astype(jnp.int32)
        out = self.router.forward(params["router"], tokens, positions, mask.astype(jnp.int32))
        return sequence_route(out.route_logits, mask)

    def combine(self, r_logits, route, e_logits, seq):
        return next_token_logprobs(None, select_expert(e_logits, seq[0]), cap=self.cap), seq[0], seq[1]

    def selection(self, route, seq):
        return seq[0], False

    def from_selected(self, r_logits, route, selected, k, with_router, seq):
        return next_token_logprobs(r_logits, selected, with_router, self.cap), seq[0], seq[1]


class SequenceLevel(Policy):
    """`sequence`: a SharedTrunkNet picks each prompt's target -- an expert alone or
    FusionRoute -- and that target's rule decodes the row. The router runs per token only
    where a target is FusionRoute."""
    routes_per_token = False
    one_expert_per_token = chooses_per_prompt = needs_selector = True

    def __init__(self, mode, n_experts, selector=None, targets: Sequence["Mode"] = ()):
        super().__init__(mode, n_experts)
        self.selector, self.targets = selector, list(targets)
        self.fused = [t.adds_router_logits for t in self.targets]
        self._fusionroute = FusionRoute(Mode("fusionroute"), n_experts)

    @property
    def router_per_token(self):
        return any(self.fused)

    @property
    def choice_width(self):
        return len(self.targets)

    def choose(self, params, tokens, mask):
        return self.selector.choose(params["selector"], tokens, mask)

    def combine(self, r_logits, route, e_logits, seq):
        """Every target's next-token log-probs, then each row's own target's (with the
        expert that produced the token, and routing weights where FusionRoute ran)."""
        target = seq[0]
        b = e_logits.shape[1]
        lps, chosen, probs = [], [], self._no_weights(b)
        for i, t in enumerate(self.targets):
            if t.fixed_expert is not None:
                lp, c = log_softmax(e_logits[t.expert], self.cap), jnp.full((b,), t.expert, jnp.int32)
            else:
                lp, c, w = self._fusionroute.combine(r_logits, route, e_logits, None)
                probs = jnp.where((target == i)[:, None], w, probs)
            lps.append(lp)
            chosen.append(c)
        pick = lambda x: jnp.take_along_axis(jnp.stack(x), target[None, :, None], axis=0)[0]
        return pick(lps), pick([c[:, None] for c in chosen])[:, 0], probs

    def selection(self, route, seq):
        fused = jnp.asarray(self.fused)[seq[0]]
        fixed = jnp.asarray([t.fixed_expert or 0 for t in self.targets], jnp.int32)[seq[0]]
        if route is None:
            return fixed, fused
        return jnp.where(fused, jnp.argmax(route_probs(route), axis=-1).astype(jnp.int32),
                         fixed), fused

    def from_selected(self, r_logits, route, selected, k, with_router, seq):
        b = selected.shape[0]
        w = route_probs(route) if route is not None else self._no_weights(b)
        # weights only where FusionRoute decoded the row
        return next_token_logprobs(r_logits, selected, with_router, self.cap), k, jnp.where(
            with_router[:, None], w, 0.0)


class Standalone(Policy):
    """`merged`, `finetuned`: one plain baseline model, decoded by `Decoder`."""
    uses_router = routes_per_token = uses_experts = needs_all_experts = False
    standalone = True


POLICIES = {"fusionroute": FusionRoute, "expert_only": ExpertOnly, "router_only": RouterOnly,
            "expert": FixedExpert, "mixture": Mixture, "sequence_head": SequenceHead,
            "sequence": SequenceLevel, "model": Standalone}


@dataclasses.dataclass(frozen=True)
class Mode:
    # fusionroute | expert_only | router_only | expert | mixture | sequence | sequence_head
    # | model (a stand-alone baseline model, named by `model`)
    kind: str
    expert: Optional[int] = None  # for kind == "expert"
    model: Optional[str] = None  # for kind == "model"

    @classmethod
    def parse(cls, name: str, n_experts: Optional[int] = None) -> "Mode":
        name = name.strip()
        if name.startswith("expert:"):
            try:
                i = int(name.split(":", 1)[1])
            except ValueError:
                raise ModeError(f"bad mode {name!r}: expected expert:<index>, e.g. expert:0") from None
            if i < 0:
                raise ModeError(f"mode {name!r}: an expert index counts from 0 (expert:0 is "
                                "the first expert); negative indices are not accepted")
            if n_experts is not None and i >= n_experts:
                raise ModeError(f"mode {name!r}: expert index out of range (there are "
                                f"{n_experts} experts, indices 0..{n_experts - 1})")
            return cls("expert", i)
        if name == "sequence:head":
            return cls("sequence_head")
        if name in STANDALONE:
            return cls("model", model=name)
        if name not in ("fusionroute", "expert_only", "router_only", "mixture", "sequence"):
            raise ModeError(f"unknown decode mode {name!r}; choose one of {', '.join(MODES)}")
        return cls(name)

    @property
    def name(self) -> str:
        if self.kind == "expert":
            return f"expert:{self.expert}"
        return {"sequence_head": "sequence:head", "model": self.model}.get(self.kind, self.kind)

    def policy(self, n_experts: int, cap: Optional[float] = None, **models) -> Policy:
        """This mode's policy for a decoder of `n_experts` experts; `cap`: the soft-cap its
        rule applies to raw logits (fusion.py; None: the models cap their own); `models`:
        what the policy itself runs (`router` for sequence:head; `selector` and `targets`
        for sequence)."""
        policy = POLICIES[self.kind](self, n_experts, **models)
        policy.cap = cap
        return policy

    @property
    def fixed_expert(self) -> Optional[int]:
        """The one expert that decodes alone (`expert:i`), else None."""
        return self.expert if self.kind == "expert" else None

    # Which models the mode runs: its policy class's word, read before any model is loaded.
    uses_router = property(lambda self: POLICIES[self.kind].uses_router)
    uses_experts = property(lambda self: POLICIES[self.kind].uses_experts)
    needs_all_experts = property(lambda self: POLICIES[self.kind].needs_all_experts)
    adds_router_logits = property(lambda self: POLICIES[self.kind].adds_router_logits)
    needs_selector = property(lambda self: POLICIES[self.kind].needs_selector)
    routes_per_prompt = property(lambda self: POLICIES[self.kind].routes_per_prompt)
    routes_per_token = property(lambda self: POLICIES[self.kind].routes_per_token)
    chooses_per_prompt = property(lambda self: POLICIES[self.kind].chooses_per_prompt)
    one_expert_per_token = property(lambda self: POLICIES[self.kind].one_expert_per_token)
    standalone = property(lambda self: POLICIES[self.kind].standalone)
