"""The fusion rule (method.md) and the few functions every decode mode's rule is made of.

FusionRoute's next-token distribution is softmax(router logits + logits of the selected
expert), the expert chosen per token by the router's routing weights w = softmax(W h).
Adding raw logits or log-probabilities gives the same distribution after the softmax, so
fusion adds log-softmaxed terms (numerically tame at any logit scale) and renormalises.
Gemma-2's final soft-cap has already been applied inside each model. The eager decoder, the
lazy experts and the training losses share these functions; the decode modes built from
them are modes.py's policies.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

ROUTER = -1  # "chosen expert" recorded for tokens the router produced alone


def route_probs(route_logits):
    """Routing weights w = softmax(W h) [B, n] (float32)."""
    return jax.nn.softmax(route_logits.astype(jnp.float32), axis=-1)


def log_softmax(x):
    return jax.nn.log_softmax(x.astype(jnp.float32), axis=-1)


def fusion_logits(router_logits, selected_logits):
    """The FusionRoute rule before normalisation: lsm(router logits) + lsm(logits of the
    selected expert), [..., V] each (the training losses normalise it per token)."""
    return log_softmax(router_logits) + log_softmax(selected_logits)


def next_token_logprobs(router_logits, selected_logits, with_router=True):
    """The next-token log-probs [B, V] from the selected expert's logits [B, V] and, where
    `with_router` (a bool, or [B] per row), the router's complementary logits [B, V] --
    the one rule the eager decoder, the lazy experts and the losses share."""
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
