"""Each training stage's loss function over (params, frozen inputs, batch), and the
forwards they are made of: the router's LM and routing logits, the frozen experts'
signals, the fused policy of CDPO. Logits are formed `block` positions at a time
(losses.blocked_token_stats), so no [B, T, V] array exists."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fr_jax.routing.experts import Experts
from fr_jax.routing.fusion import fusion_logits, model_cap, soft_cap
from fr_jax.routing.router import Router
from fr_jax.steps import losses

SFT_FIELDS = ("tokens", "positions", "segment_ids", "targets", "loss_mask")


# ---------------------------------------------------------------------------- losses in the step
def _unroll(model) -> bool:
    return model.cfg.scan_unroll


def router_outputs(router: Router, params, side, vocab: int, block: int):
    """(TokenStats of the router's own LM [B, T], routing logits [B, T, n], final hidden
    states [B, T, E]) with the LM logits formed `block` positions at a time
    (losses.blocked_token_stats), soft-capped as the router alone is (fusion.softcap)."""
    out = router.forward(params, side["tokens"], side["positions"], side["segment_ids"],
                         with_logits=False)
    cap = model_cap(router.cfg)
    stats = losses.blocked_token_stats(
        lambda h: soft_cap(router.lm_logits(params, h)[..., :vocab], cap), out.hidden,
        side["targets"], block, _unroll(router))
    return stats, out.route_logits, out.hidden


def model_token_stats(model, params, batch, vocab: int, block: int) -> losses.TokenStats:
    """TokenStats [B, T] of one plain Model's next-token distribution over a batch, its
    logits formed `block` positions at a time (an expert's signals, stage `lm`), soft-capped
    as the model alone is (fusion.softcap)."""
    hidden = model.forward(params, batch["tokens"], batch["positions"], batch["segment_ids"],
                           with_logits=False).hidden
    cap = model_cap(model.cfg)
    return losses.blocked_token_stats(
        lambda h: soft_cap(model.logits(params, h)[..., :vocab], cap), hidden,
        batch["targets"], block, _unroll(model))


def fused_stats(router: Router, params, hidden, experts: Experts, e_params, e_hidden,
                selected, targets, vocab: int, block: int) -> losses.TokenStats:
    """TokenStats [B, T] of the fused policy log_softmax(lsm(q) + lsm(p_k)): q the router's
    logits from its final hidden states [B, T, E], p_k those of the expert selected[b, t]
    (from e_hidden, Experts.hidden; a fixed bias), formed `block` positions at a time;
    with fusion.softcap=sum, cap * tanh((q + p_k) / cap) of the raw logits instead."""
    cap = model_cap(router.cfg)

    def logits(inp):
        h, eh, sel = inp
        bias = jax.lax.stop_gradient(experts.selected_logits(e_params, eh, sel))
        return fusion_logits(router.lm_logits(params, h)[..., :vocab], bias, cap)

    return losses.blocked_token_stats(logits, (hidden, e_hidden, selected), targets, block,
                                      _unroll(router))


def make_signals_fn(experts: Experts, vocab: int, block: int = 0):
    """(expert params, batch) -> (target log-prob, top-1 token) of every expert at every
    position: [n, B, T] each, one expert at a time, logits formed `block` positions at a
    time, so neither [n, B, T, V] nor [B, T, V] exists."""
    def signals(e_params, batch):
        def one_expert(model, p):
            st = model_token_stats(model, p, batch, vocab, block)
            return st.logprob, st.argmax
        return experts.map(e_params, one_expert)
    return signals


def expert_signals_online(experts: Experts, e_params, batch, vocab: int, block: int = 0):
    """The experts' stage-1 signals computed inside the step (see make_signals_fn)."""
    return make_signals_fn(experts, vocab, block)(e_params, batch)


def sft_needs_experts(stage_cfg) -> bool:
    """Whether stage 1's step runs the experts: online signals, or a generator term on the
    fused policy (it needs the selected expert's whole distribution at every position)."""
    return stage_cfg.expert_signals == "online" or stage_cfg.lm_target != "router"


def sft_loss_fn(router: Router, experts: Experts, vocab: int, stage_cfg, block: int = 0):
    """(params, frozen, batch) -> (loss, metrics): L_route + lm_weight * L_lm, L_lm on the
    router's own LM, the fused policy or a mix of both (stage_cfg.lm_target)."""
    def loss_fn(params, frozen, batch):
        lm_stats, route_logits, hidden = router_outputs(router, params, batch, vocab, block)
        targets = batch["targets"]
        if "signal_logprob" in batch:  # precomputed: [B, T, n] -> [n, B, T]
            target_lp = jnp.moveaxis(batch["signal_logprob"], -1, 0)
            top1 = jnp.moveaxis(batch["signal_top1"], -1, 0)
        else:
            target_lp, top1 = expert_signals_online(experts, frozen["experts"], batch, vocab,
                                                    block)
        signals = losses.ExpertSignals(jax.lax.stop_gradient(target_lp), top1)
        fused = None
        if stage_cfg.lm_target != "router":
            e_params = frozen["experts"]
            e_hidden = experts.hidden(e_params, batch["tokens"], batch["positions"],
                                      batch["segment_ids"])
            # k_t as at decode time: the routing head's argmax (a choice, no gradient).
            selected = jnp.argmax(jax.lax.stop_gradient(route_logits), axis=-1)
            fused = fused_stats(router, params, hidden, experts, e_params, e_hidden, selected,
                                targets, vocab, block)
        return losses.sft_loss(lm_stats, route_logits, targets, batch["loss_mask"], signals,
                               stage_cfg.lm_weight, stage_cfg.routing_loss, fused,
                               stage_cfg.lm_target, stage_cfg.lm_mix, stage_cfg.lm_positions)
    return loss_fn


def reference_outputs(router: Router, experts: Experts, vocab: int, block: int, ref_params,
               e_params, e_hidden, side):
    """The stage-1 router's side of CDPO on one side of the pairs: (sequence log-prob of
    the fused policy under it [B], its routing logits [B, T, n] float32)."""
    out = router.forward(ref_params, side["tokens"], side["positions"], side["segment_ids"],
                         with_logits=False)
    route = out.route_logits.astype(jnp.float32)
    stats = fused_stats(router, ref_params, out.hidden, experts, e_params, e_hidden,
                        jnp.argmax(route, axis=-1), side["targets"], vocab, block)
    return losses.sequence_logprob(stats.logprob, side["loss_mask"]), route


def cdpo_loss_fn(router: Router, experts: Experts, vocab: int, stage_cfg, block: int = 0,
                 sft_cfg=None):
    """(params, frozen, batch) -> (loss, metrics) of complementary DPO on the fused policy.

    The expert k_t of every token is chosen by the frozen stage-1 router (`frozen["ref"]`),
    so the expert's log-probabilities are a fixed bias; the same router is the reference.
    When the batch sides carry `ref_logprob` [B] and `ref_route_logits` [B, T, n]
    (train.cdpo.reference = precompute), the stage-1 router is not in the step at all.
    Plus `route_kl` x KL(stage-1 routing weights || current ones): the routing head is
    frozen, but without this the moving backbone would change the routing at decode time.
    Plus `chosen_nll` x the fused policy's per-token NLL of the chosen answers (as in RPO,
    Pang et al. 2024): DPO alone may lower the chosen answers' likelihood along with the
    rejected ones'; this keeps the policy producing them.
    Plus `sft_weight` x stage 1's loss (`sft_cfg`, train.sft's terms, the experts' signals
    computed in the step) on the batch's `sft` rows: the paper's guard against degenerate
    routing, stage 1's supervision kept on during the preference stage. With head = "sft"
    the routing head trains, on that term's gradient alone (the preference and anchor terms
    see it through a stop-gradient: they update the LM part only).
    """
    def seq_logprobs(params, frozen, side):
        e_params = frozen["experts"]
        args = (side["tokens"], side["positions"], side["segment_ids"])
        e_hidden = experts.hidden(e_params, *args)
        if "ref_logprob" in side:
            ref, ref_route = side["ref_logprob"], side["ref_route_logits"]
        else:
            ref, ref_route = reference_outputs(router, experts, vocab, block, frozen["ref"], e_params,
                                        e_hidden, side)
        ref_route = jax.lax.stop_gradient(ref_route)
        pol_out = router.forward(params, *args, with_logits=False)
        pol = losses.sequence_logprob(
            fused_stats(router, params, pol_out.hidden, experts, e_params, e_hidden,
                        jnp.argmax(ref_route, axis=-1), side["targets"], vocab,
                        block).logprob, side["loss_mask"])
        kl = losses.routing_kl(ref_route, pol_out.route_logits, side["loss_mask"])
        return pol, jax.lax.stop_gradient(ref), kl

    sft_term = (sft_loss_fn(router, experts, vocab, sft_cfg, block)
                if sft_cfg is not None and stage_cfg.sft_weight > 0 else None)

    def loss_fn(params, frozen, batch):
        cdpo_params = params
        if stage_cfg.head == "sft":  # the routing head learns from the SFT term alone
            cdpo_params = dict(params, head=jax.lax.stop_gradient(params["head"]))
        loss, metrics = cdpo_terms(cdpo_params, frozen, batch)
        if sft_term is not None and "sft" in batch:  # eval batches carry pairs only
            sft_loss, sft_metrics = sft_term(params, frozen, batch["sft"])
            loss = loss + stage_cfg.sft_weight * sft_loss
            metrics.update({f"sft_{k}": v for k, v in sft_metrics.items()
                            if k in ("loss", "route_loss", "generator_loss", "route_acc")})
            metrics["loss"] = loss
        return loss, metrics

    def cdpo_terms(params, frozen, batch):
        pc, rc, kl_c = seq_logprobs(params, frozen, batch["chosen"])
        pr, rr, kl_r = seq_logprobs(params, frozen, batch["rejected"])
        # Padding rows (no response tokens) carry no preference.
        valid = (batch["chosen"]["loss_mask"].sum(-1) > 0).astype(jnp.float32)
        margin = stage_cfg.beta * ((pc - rc) - (pr - rr))
        dpo = -jnp.sum(jax.nn.log_sigmoid(margin) * valid) / jnp.maximum(valid.sum(), 1.0)
        route_kl = 0.5 * (kl_c + kl_r)
        n_chosen = jnp.maximum(batch["chosen"]["loss_mask"].sum(), 1.0)
        nll = -jnp.sum(pc * valid) / n_chosen
        loss = dpo + stage_cfg.route_kl * route_kl + stage_cfg.chosen_nll * nll
        _, metrics = losses.cdpo_loss(pc, pr, rc, rr, stage_cfg.beta)
        metrics.update(loss=loss, dpo_loss=dpo, route_kl=route_kl, chosen_nll=nll)
        return loss, metrics
    return loss_fn


def lm_loss_fn(model, vocab: int, block: int = 0):
    """(params, frozen, batch) -> (loss, metrics): next-token cross-entropy of one plain
    model on the response tokens (stage `lm`; `frozen` is empty)."""
    def loss_fn(params, frozen, batch):
        del frozen
        stats = model_token_stats(model, params, batch, vocab, block)
        loss, acc = losses.lm_loss_from_stats(stats, batch["targets"], batch["loss_mask"])
        return loss, {"loss": loss, "lm_loss": loss, "token_accuracy": acc}
    return loss_fn
