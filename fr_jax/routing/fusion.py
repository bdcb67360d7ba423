"""The fusion rule (method.md) and the few functions every decode mode's rule is made of.

FusionRoute's next-token distribution is softmax(router logits + logits of the selected
expert), the expert chosen per token by the router's routing weights w = softmax(W h).
Adding raw logits or log-probabilities gives the same distribution after the softmax, so
fusion adds log-softmaxed terms (numerically tame at any logit scale) and renormalises.

Gemma-2 soft-caps its final logits, c * tanh(x / c), and the order of cap and sum is a
choice (`fusion.softcap`): `each` (the default) caps each model's logits inside the model,
then sums; `sum` leaves the models' logits raw (ModelConfig.raw_logits) and caps their
sum, softmax(c * tanh((q + p_k) / c)) -- a cap is not shift-invariant, so that sum is of
raw logits, not of log-softmaxes. A model's distribution alone is capped either way. The
functions below take that cap (`cap`, None under `each`). The eager decoder, the lazy
experts and the training losses share them; the decode modes built from them are
modes.py's policies.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

ROUTER = -1  # "chosen expert" recorded for tokens the router produced alone


def route_probs(route_logits):
    """Routing weights w = softmax(W h) [B, n] (float32)."""
    return jax.nn.softmax(route_logits.astype(jnp.float32), axis=-1)


def soft_cap(x, cap):
    """Gemma-2's final soft-cap cap * tanh(x / cap) (float32); x itself for cap None."""
    x = x.astype(jnp.float32)
    return x if cap is None else jnp.tanh(x / cap) * cap


def model_cap(cfg):
    """The cap the fusion rule applies for a model whose logits come raw
    (cfg.raw_logits: fusion.softcap=sum), else None (capped inside, or no cap)."""
    return cfg.final_logit_softcap if cfg.raw_logits else None


def lineup_cfgs(router, experts) -> list:
    """The model configs of a lineup, the router's first; either side may be None."""
    return ([router.cfg] if router is not None else []) + (
        list(experts.cfgs) if experts is not None else [])


def rule_cap(cfgs):
    """The one cap of the fusion rule over a lineup's router and expert configs (model_cap
    of each model whose logits it combines; they must agree)."""
    caps = {model_cap(c) for c in cfgs}
    if len(caps) > 1:
        raise ValueError(f"the models' logits are not all left to one cap: {sorted(caps, key=str)}"
                         "; load them with one fusion.softcap setting")
    return caps.pop() if caps else None


def log_softmax(x, cap=None):
    """Log-probs of one model's logits [..., V], soft-capped first by `cap` (model_cap)."""
    return jax.nn.log_softmax(soft_cap(x, cap), axis=-1)


def fusion_logits(router_logits, selected_logits, cap=None):
    """The FusionRoute rule before normalisation, [..., V] each (the training losses
    normalise it per token): lsm(router logits) + lsm(logits of the selected expert), or
    with `cap` (fusion.softcap=sum, raw logits) cap * tanh((router + selected) / cap)."""
    if cap is not None:
        return soft_cap(router_logits.astype(jnp.float32) + selected_logits, cap)
    return log_softmax(router_logits) + log_softmax(selected_logits)


def next_token_logprobs(router_logits, selected_logits, with_router=True, cap=None):
    """The next-token log-probs [B, V] from the selected expert's logits [B, V] and, where
    `with_router` (a bool, or [B] per row), the router's complementary logits [B, V] --
    the one rule the eager decoder, the lazy experts and the losses share. `cap`: see
    fusion_logits."""
    alone = log_softmax(selected_logits, cap)
    if router_logits is None or with_router is False:
        return alone
    fused = log_softmax(fusion_logits(router_logits, selected_logits, cap))
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
