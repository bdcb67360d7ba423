"""Training losses of the two FusionRoute stages (see method.md), as pure functions.

Notation (per training sequence, t over positions): y_t the target token, m_t the response
mask (1 where y_t is trained), w_t = softmax(W h_t) the routing weights [n], q_t the router's
LM distribution, p_i,t expert i's distribution. Shapes: B=batch, T=positions, V=vocab,
n=experts. All reductions are in float32.
"""

from __future__ import annotations

from typing import Dict, NamedTuple

import jax
import jax.numpy as jnp

from fr_jax.config import CHOICES
from fr_jax.routing.fusion import fusion_logits


class ExpertSignals(NamedTuple):
    """What stage 1 needs from the frozen experts at every position.

    target_logprob: [n, B, T] log p_i,t(y_t); top1: [n, B, T] argmax_v p_i,t(v).
    Computed in the step from the experts' logits, or precomputed and cached to disk.
    """

    target_logprob: jax.Array
    top1: jax.Array


def expert_signals(expert_logits, targets) -> ExpertSignals:
    """expert_logits [n, B, T, V], targets [B, T] -> ExpertSignals (no gradient)."""
    expert_logits = jax.lax.stop_gradient(expert_logits)
    lp = jax.nn.log_softmax(expert_logits.astype(jnp.float32), axis=-1)
    target = jnp.take_along_axis(lp, targets[None, :, :, None], axis=-1)[..., 0]
    return ExpertSignals(target, jnp.argmax(expert_logits, axis=-1).astype(jnp.int32))


def informative_mask(top1, loss_mask):
    """I = {t : the experts' top-1 tokens are not all equal} within the response.

    top1 [n, B, T], loss_mask [B, T] -> bool [B, T].
    """
    disagree = jnp.any(top1 != top1[:1], axis=0)
    return disagree & (loss_mask > 0)


def _masked_mean(x, mask):
    mask = mask.astype(jnp.float32)
    return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def token_logprob(logits, targets):
    """log softmax(logits)(targets): [B, T, V], [B, T] -> [B, T] float32."""
    lp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(lp, targets[..., None], axis=-1)[..., 0]


class TokenStats(NamedTuple):
    """Per-position statistics of a distribution over the vocabulary: [B, T] each."""

    logprob: jax.Array  # log softmax(logits)(y_t), float32
    argmax: jax.Array  # argmax_v logits, int32


def blocked_token_stats(logits_fn, inputs, targets, block: int = 0,
                        unroll: bool = False) -> TokenStats:
    """TokenStats of logits_fn(inputs), formed `block` positions at a time.

    inputs: a pytree of [B, T, ...] arrays (hidden states, per-token expert choices);
    logits_fn(inputs over a block [B, t, ...]) -> float32 logits [B, t, V]. The positions
    are scanned in blocks under `jax.checkpoint`, so the forward keeps no logits and the
    backward re-forms one block's at a time: memory holds [B, block, V], never [B, T, V]
    (Gemma's 256k vocabulary at T = 2048 is 2 GB of float32 per row). block <= 0 or >= T:
    one block (the whole sequence). `unroll` unrolls the scan (cost analysis: fr_jax.plan).
    """
    b, t = targets.shape
    if block <= 0 or block >= t:
        logits = logits_fn(inputs)
        return TokenStats(token_logprob(logits, targets),
                          jnp.argmax(logits, axis=-1).astype(jnp.int32))
    n = -(-t // block)
    pad = n * block - t

    def blocks(x):  # [B, T, ...] -> [n, B, block, ...]
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        return jnp.moveaxis(x.reshape((b, n, block) + x.shape[2:]), 1, 0)

    @jax.checkpoint
    def body(carry, xs):
        inp, y = xs
        logits = logits_fn(inp).astype(jnp.float32)
        lp = jnp.take_along_axis(logits, y[..., None], axis=-1)[..., 0] - \
            jax.nn.logsumexp(logits, axis=-1)
        return carry, (lp, jnp.argmax(logits, axis=-1).astype(jnp.int32))

    _, (lp, am) = jax.lax.scan(body, None, (jax.tree.map(blocks, inputs), blocks(targets)),
                               unroll=n if unroll else 1)
    unblock = lambda x: jnp.moveaxis(x, 0, 1).reshape(b, n * block)[:, :t]
    return TokenStats(unblock(lp), unblock(am))


def lm_loss(logits, targets, loss_mask):
    """(mean NLL of the targets, next-token accuracy) over masked positions:
    [B, T, V], [B, T], [B, T] -> two float32 scalars."""
    stats = TokenStats(token_logprob(logits, targets),
                       jnp.argmax(logits, axis=-1).astype(jnp.int32))
    return lm_loss_from_stats(stats, targets, loss_mask)


def lm_loss_from_stats(stats: TokenStats, targets, loss_mask):
    """`lm_loss` from per-position TokenStats (e.g. `blocked_token_stats`)."""
    nll = -_masked_mean(stats.logprob, loss_mask)
    acc = _masked_mean((stats.argmax == targets).astype(jnp.float32), loss_mask)
    return nll, acc


def routing_loss(route_logits, signals: ExpertSignals, informative, kind: str = "mixture"):
    """Routing loss on informative positions.

    mixture:     -mean_{t in I} log sum_i w_t,i p_i,t(y_t)
    best_expert: cross-entropy of w_t against argmax_i p_i,t(y_t)
    route_logits [B, T, n].
    """
    log_w = jax.nn.log_softmax(route_logits.astype(jnp.float32), axis=-1)  # [B, T, n]
    if kind == "mixture":
        per_t = -jax.nn.logsumexp(log_w + jnp.moveaxis(signals.target_logprob, 0, -1), axis=-1)
    elif kind == "best_expert":
        best = jnp.argmax(signals.target_logprob, axis=0)  # [B, T]
        per_t = -jnp.take_along_axis(log_w, best[..., None], axis=-1)[..., 0]
    else:
        raise ValueError(f"unknown routing_loss {kind!r}; use one of {ROUTING_LOSSES}")
    return _masked_mean(per_t, informative)


# The words of train.sft's fields, declared once in their config rows.
ROUTING_LOSSES = CHOICES["train.sft.routing_loss"]
LM_TARGETS = CHOICES["train.sft.lm_target"]
LM_POSITIONS = CHOICES["train.sft.lm_positions"]


def generator_loss(own: "TokenStats", fused, targets, loss_mask, informative,
                   target: str = "router", mix: float = 0.5, positions: str = "all"):
    """Stage 1's generator term L_lm (fr_jax's open reading, method.md), -> (L_lm, parts).

    router: -mean_{t in R} log q_t(y_t)                  (the router as a stand-alone LM)
    fused:  -mean_{t in S} log f_t(y_t), f_t = softmax(lsm q_t + lsm p_{k_t,t}), k_t the
            routing head's choice, no gradient into the expert (the router as a complement)
    mix:    (1 - mix) * router + mix * fused
    R: the response positions; S = R (`positions="all"`) or I (`"informative"`, where the
    experts' top-1 tokens differ). own / fused: TokenStats [B, T] of q and f (fused is None
    for `router`). parts: the router's own NLL ("lm_loss") and, with fused, "fused_loss".
    """
    if target not in LM_TARGETS:
        raise ValueError(f"unknown lm_target {target!r}; use one of {LM_TARGETS}")
    if positions not in LM_POSITIONS:
        raise ValueError(f"unknown lm_positions {positions!r}; use one of {LM_POSITIONS}")
    l_own, _ = lm_loss_from_stats(own, targets, loss_mask)
    parts = {"lm_loss": l_own}
    if target == "router":
        return l_own, parts
    where = informative if positions == "informative" else loss_mask > 0
    l_fused = -_masked_mean(fused.logprob, where)
    parts["fused_loss"] = l_fused
    if target == "fused":
        return l_fused, parts
    return (1.0 - mix) * l_own + mix * l_fused, parts


def sft_loss(lm, route_logits, targets, loss_mask, signals: ExpertSignals,
             lm_weight: float = 1.0, routing: str = "mixture", fused=None,
             lm_target: str = "router", lm_mix: float = 0.5, lm_positions: str = "all"):
    """L_SFT = L_route + lm_weight * L_lm, and the stage-1 metrics.

    lm: the router's LM logits [B, T, V], or their TokenStats [B, T] (formed blockwise);
    route_logits [B, T, n], targets / loss_mask [B, T]; fused: TokenStats [B, T] of the
    fused policy (lm_target fused / mix; see generator_loss).
    Returns (loss, metrics dict of scalars + "route_share" [n]).
    """
    informative = informative_mask(signals.top1, loss_mask)
    if not isinstance(lm, TokenStats):
        lm = TokenStats(token_logprob(lm, targets), jnp.argmax(lm, axis=-1).astype(jnp.int32))
    l_lm, parts = generator_loss(lm, fused, targets, loss_mask, informative, lm_target, lm_mix,
                                 lm_positions)
    l_route = routing_loss(route_logits, signals, informative, routing)
    loss = l_route + lm_weight * l_lm
    w = jax.nn.softmax(route_logits.astype(jnp.float32), axis=-1)
    best = jnp.argmax(signals.target_logprob, axis=0)
    chosen = jnp.argmax(w, axis=-1)
    resp = loss_mask > 0
    n_resp = jnp.maximum(jnp.sum(resp), 1)
    metrics: Dict[str, jax.Array] = {
        "loss": loss,
        **parts,
        "generator_loss": l_lm,
        "route_loss": l_route,
        "informative_frac": jnp.sum(informative) / n_resp,
        "route_acc": _masked_mean((chosen == best).astype(jnp.float32), informative),
        # Share of response tokens each expert would be selected for.
        "route_share": jnp.sum(jax.nn.one_hot(chosen, w.shape[-1]) * resp[..., None],
                               axis=(0, 1)) / n_resp,
    }
    return loss, metrics


def select_per_token(expert_logits, selected):
    """expert_logits [n, B, T, V], selected [B, T] -> the selected expert's logits [B, T, V]."""
    return jnp.take_along_axis(expert_logits, selected[None, :, :, None], axis=0)[0]


def fused_logprob(router_logits, selected_logits, targets):
    """Per-token log-prob of the fused policy: log_softmax(lsm(q) + lsm(p_k))(y_t).

    router_logits [B, T, V]; selected_logits [B, T, V] of the expert k_t chosen by the
    frozen routing head (held fixed: no gradient flows into it) -> [B, T].
    """
    return token_logprob(fusion_logits(router_logits, jax.lax.stop_gradient(selected_logits)),
                         targets)


def sequence_logprob(token_lp, loss_mask):
    """Sum over response tokens: [B, T] -> [B]."""
    return jnp.sum(token_lp * loss_mask.astype(jnp.float32), axis=-1)


def cdpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float = 0.1):
    """Complementary DPO on sequence log-probs of the fused policy [B] each.

    L = -log sigmoid(beta [(pi_c - ref_c) - (pi_r - ref_r)]), averaged over pairs.
    """
    chosen_reward = beta * (policy_chosen - ref_chosen)
    rejected_reward = beta * (policy_rejected - ref_rejected)
    margin = chosen_reward - rejected_reward
    loss = -jnp.mean(jax.nn.log_sigmoid(margin))
    return loss, {
        "loss": loss,
        "reward_chosen": jnp.mean(chosen_reward),
        "reward_rejected": jnp.mean(rejected_reward),
        "reward_margin": jnp.mean(margin),
        "pref_acc": jnp.mean((margin > 0).astype(jnp.float32)),
    }


def routing_kl(ref_route_logits, route_logits, mask):
    """Mean KL(w_ref || w) of routing weights over masked positions: [B, T, n] x2, [B, T].

    CDPO freezes the routing head, but the backbone under it moves, and with it the routing
    weights; this term anchors them to the stage-1 router's (fr_jax)."""
    ref = jax.nn.log_softmax(ref_route_logits.astype(jnp.float32), axis=-1)
    pol = jax.nn.log_softmax(route_logits.astype(jnp.float32), axis=-1)
    return _masked_mean(jnp.sum(jnp.exp(ref) * (ref - pol), axis=-1), mask)
