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

`sequence` is sequence-level routing on prefill activations (fr_jax/baselines/seqroute.py):
a SharedTrunkNet reads the encoder's pooled activations of the prompt and picks a target --
an expert alone or FusionRoute itself -- which then decodes the whole answer.
`sequence:head` is the simplest sequence-level router: s = argmax of the router's routing
weights averaged over the prompt's tokens (the router reads the prompt once).
`merged` and `finetuned` name single models (fr_jax/baselines/merge.py, train stage `lm`);
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

ROUTER = -1  # "chosen expert" recorded for tokens the router produced alone
MODES = ("fusionroute", "expert_only", "router_only", "expert:<i>", "mixture", "sequence",
         "sequence:head", "merged", "finetuned")
STANDALONE = ("merged", "finetuned")  # baselines that are one plain model


class ModeError(ValueError):
    """Unknown decode mode, or one that does not fit the models given."""


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
            if i < 0 or (n_experts is not None and i >= n_experts):
                raise ModeError(f"mode {name!r}: expert index out of range "
                                f"(there are {n_experts} experts, indices 0..{(n_experts or 1) - 1})")
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
    lsm = lambda x: jax.nn.log_softmax(x.astype(jnp.float32), axis=-1)
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
    if mode.kind == "expert_only":
        return Fused(lsm(selected), k, w)
    return Fused(lsm(lsm(router_logits) + lsm(selected)), k, w)  # fusionroute


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
