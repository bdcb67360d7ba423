"""Per-step fusion of router and expert logits, one pure function per decode mode.

A decode mode is data (`Mode`), parsed from its name:

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

`sequence` is sequence-level routing on prefill activations (fr_jax/routing/):
a SharedTrunkNet reads the encoder's pooled activations of the prompt and picks a target --
an expert alone or FusionRoute itself -- which then decodes the whole answer.
`sequence:head` is the simplest sequence-level router: s = argmax of the router's routing
weights averaged over the prompt's tokens (the router reads the prompt once).
`merged` and `finetuned` name single models (fr_jax/baselines/merging.py, train stage `lm`);
they are decoded by the plain `Decoder`, not fused.

Adding raw logits or log-probabilities gives the same distribution after the softmax, so
fusion adds log-softmaxed terms (numerically tame at any logit scale) and renormalises.
Gemma-2's final soft-cap has already been applied inside each model.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

from fr_jax.runtime.errors import ModeError

ROUTER = -1  # "chosen expert" recorded for tokens the router produced alone
MODES = ("fusionroute", "expert_only", "router_only", "expert:<i>", "mixture", "sequence",
         "sequence:head", "merged", "finetuned")
STANDALONE = ("merged", "finetuned")  # baselines that are one plain model


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

    @property
    def uses_router(self) -> bool:
        """The router's params are needed (`sequence`: its backbone is the default encoder
        and FusionRoute a target)."""
        return self.kind not in ("expert", "model")

    @property
    def uses_experts(self) -> bool:
        return self.kind not in ("router_only", "model")

    @property
    def needs_all_experts(self) -> bool:
        return self.kind in ("fusionroute", "expert_only", "mixture", "sequence",
                             "sequence_head")

    @property
    def fixed_expert(self) -> Optional[int]:
        """The one expert that decodes alone (`expert:i`), else None."""
        return self.expert if self.kind == "expert" else None

    @property
    def adds_router_logits(self) -> bool:
        """The router's complementary logits join the selected expert's (FusionRoute)."""
        return self.kind == "fusionroute"

    @property
    def needs_selector(self) -> bool:
        """A SharedTrunkNet picks each prompt's target (`sequence`)."""
        return self.kind == "sequence"

    @property
    def routes_per_prompt(self) -> bool:
        """The router's head reads the prompt once and picks its expert (`sequence:head`)."""
        return self.kind == "sequence_head"

    @property
    def standalone(self) -> bool:
        """One plain baseline model (decoded by `Decoder`, no router, no fusion)."""
        return self.kind == "model"

    @property
    def one_expert_per_token(self) -> bool:
        """Each token comes from one selected expert (with or without the router's logits),
        so lazy experts can skip the others."""
        return self.kind in ("fusionroute", "expert_only", "sequence_head", "sequence")

    @property
    def chooses_per_prompt(self) -> bool:
        """The prompt is read once and fixes what decodes each row (the sequence modes)."""
        return self.kind in ("sequence", "sequence_head")

    @property
    def routes_per_token(self) -> bool:
        """The router runs at every step (not: expert:i; the sequence modes, where the
        prompt is read once -- unless a SharedTrunkNet target is FusionRoute, which the
        decoder decides)."""
        return self.kind in ("fusionroute", "expert_only", "router_only", "mixture")


@dataclasses.dataclass
class Fused:
    logprobs: jax.Array  # [B, V] normalised next-token log-probabilities
    chosen: jax.Array  # [B] int32 expert index (ROUTER for the router alone)
    route_probs: Optional[jax.Array]  # [B, n] routing weights, None without a router


def route_probs(route_logits):
    """Routing weights w = softmax(W h) [B, n] (float32)."""
    return jax.nn.softmax(route_logits.astype(jnp.float32), axis=-1)


def fuse(mode: Mode, router_logits=None, route_logits=None, expert_logits=None) -> Fused:
    """router_logits [B, V], route_logits [B, n], expert_logits [n', B, V] -> Fused.

    For `expert:i` the caller passes only expert i's logits (n' = 1), so that the other
    experts are never run; otherwise n' = n.
    """
    lsm = log_softmax
    if mode.kind == "router_only":
        b = router_logits.shape[0]
        return Fused(lsm(router_logits), jnp.full((b,), ROUTER, jnp.int32),
                     route_probs(route_logits))
    if mode.kind == "expert":
        b = expert_logits.shape[1]
        return Fused(lsm(expert_logits[0]), jnp.full((b,), mode.expert, jnp.int32), None)

    w = route_probs(route_logits)
    k = jnp.argmax(w, axis=-1).astype(jnp.int32)
    if mode.kind == "mixture":
        mix = jax.nn.logsumexp(jnp.log(w).T[:, :, None] + lsm(expert_logits), axis=0)
        return Fused(mix, k, w)
    selected = select_expert(expert_logits, k)
    return Fused(next_token_logprobs(router_logits if mode.kind == "fusionroute" else None,
                                     selected), k, w)


def log_softmax(x):
    return jax.nn.log_softmax(x.astype(jnp.float32), axis=-1)


def fusion_logits(router_logits, selected_logits):
    """The FusionRoute rule before normalisation: lsm(router logits) + lsm(logits of the
    selected expert), [..., V] each (the training losses normalise it per token)."""
    return log_softmax(router_logits) + log_softmax(selected_logits)


def next_token_logprobs(router_logits, selected_logits, with_router=True):
    """The next-token log-probs [B, V] from the selected expert's logits [B, V] and, where
    `with_router` (a bool, or [B] per row), the router's complementary logits [B, V] --
    the one rule the eager decoder (`fuse`), the lazy experts and the losses share."""
    alone = log_softmax(selected_logits)
    if router_logits is None or with_router is False:
        return alone
    fused = log_softmax(fusion_logits(router_logits, selected_logits))
    if with_router is True:
        return fused
    return jnp.where(with_router[:, None], fused, alone)


def sequence_route(route_logits, mask):
    """Sequence-level routing: route_logits [B, T, n] over a prompt, mask [B, T] (real
    tokens) -> (per-prompt expert s [B] int32, averaged routing weights [B, n])."""
    w = route_probs(route_logits)
    m = mask.astype(jnp.float32)[..., None]
    avg = jnp.sum(w * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)
    return jnp.argmax(avg, axis=-1).astype(jnp.int32), avg


def select_expert(expert_logits, k):
    """expert_logits [n, B, V], k [B] -> the row-wise selected expert's logits [B, V]."""
    return jnp.take_along_axis(expert_logits, k[None, :, None], axis=0)[0]
