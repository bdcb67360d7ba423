"""Training the router: stage 1 SFT on informative tokens, stage 2 CDPO (method.md); and
stage `lm`: one ordinary model fine-tuned on the SFT data (experts, the fine-tuned baseline).

    python -m fr_jax.train --config=configs/tiny.py
    python -m fr_jax.train --config=configs/gemma2.py --config.train.sft.lr=1e-5

Each stage is a jitted step with in/out shardings over the mesh (params and optimizer state
sharded alike by the logical-axis rules; batches over data/fsdp), checkpointed with Orbax
(params, optimizer state, step, data position, RNG; atomic; the last K kept) and resumed
from the latest good checkpoint, even onto another mesh. The experts are frozen inputs of
the step: never differentiated, never in the optimizer state.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time
from typing import Callable, Dict, Optional

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from fr_jax import losses
from fr_jax import sharding as sh
from fr_jax.config import frozen_dtype
from fr_jax.data import Batcher, load_records, tokenize_pref, tokenize_sft
from fr_jax.experts import Experts
from fr_jax.router import Router

log = logging.getLogger("fr_jax.train")


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer updates done (micro-steps // grad_accum)
    micro: jax.Array  # int32 scalar: micro-steps done
    params: dict  # router params
    opt_state: optax.OptState
    rng: jax.Array  # raw uint32 key data (checkpoint-friendly)


# ---------------------------------------------------------------------------- optimizer
def make_optimizer(stage_cfg, train_cfg, params, frozen_head: bool = False):
    """AdamW with warmup + cosine decay and global-norm clipping (gradients are accumulated
    over micro-batches inside the step, see `make_train_step`).

    Weight decay skips 1-D params (norm scales, biases). With `frozen_head` the routing head
    gets no updates and no optimizer state (CDPO trains the LM part only).
    """
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=stage_cfg.lr, warmup_steps=max(stage_cfg.warmup, 1),
        decay_steps=max(stage_cfg.steps, stage_cfg.warmup + 1),
        end_value=stage_cfg.lr * stage_cfg.final_lr_frac)
    decay_mask = jax.tree.map(lambda x: x.ndim > 1, params)
    tx = optax.chain(
        optax.clip_by_global_norm(train_cfg.clip),
        optax.adamw(schedule, b1=train_cfg.b1, b2=train_cfg.b2,
                    weight_decay=train_cfg.weight_decay, mask=decay_mask))
    if frozen_head:
        labels = {"backbone": jax.tree.map(lambda _: "train", params["backbone"]),
                  "head": jax.tree.map(lambda _: "frozen", params["head"])}
        tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
    return tx, schedule


# ---------------------------------------------------------------------------- losses in the step
def _unroll(model) -> bool:
    return model.cfg.scan_unroll


def router_outputs(router: Router, params, side, vocab: int, block: int):
    """(TokenStats of the router's own LM [B, T], routing logits [B, T, n]) with the LM
    logits formed `block` positions at a time (losses.blocked_token_stats)."""
    out = router.forward(params, side["tokens"], side["positions"], side["segment_ids"],
                         with_logits=False)
    stats = losses.blocked_token_stats(
        lambda h: router.lm_logits(params, h)[..., :vocab], out.hidden, side["targets"],
        block, _unroll(router))
    return stats, out.route_logits


def model_token_stats(model, params, batch, vocab: int, block: int) -> losses.TokenStats:
    """TokenStats [B, T] of one plain Model's next-token distribution over a batch, its
    logits formed `block` positions at a time (an expert's signals, stage `lm`)."""
    hidden = model.forward(params, batch["tokens"], batch["positions"], batch["segment_ids"],
                           with_logits=False).hidden
    return losses.blocked_token_stats(lambda h: model.logits(params, h)[..., :vocab], hidden,
                                      batch["targets"], block, _unroll(model))


def fused_stats(router: Router, params, hidden, experts: Experts, e_params, e_hidden,
                selected, targets, vocab: int, block: int) -> losses.TokenStats:
    """TokenStats [B, T] of the fused policy log_softmax(lsm(q) + lsm(p_k)): q the router's
    logits from its final hidden states [B, T, E], p_k those of the expert selected[b, t]
    (from e_hidden, Experts.hidden; a fixed bias), formed `block` positions at a time."""
    def logits(inp):
        h, eh, sel = inp
        lsm = lambda x: jax.nn.log_softmax(x.astype(jnp.float32), axis=-1)
        bias = jax.lax.stop_gradient(lsm(experts.selected_logits(e_params, eh, sel)))
        return lsm(router.lm_logits(params, h)[..., :vocab]) + bias

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


def _in_order_batches(examples, batch_size: int, seq_len: int, kind: str, progress: bool,
                      desc: str):
    """(offset, chunk, rows) over `examples` in order, one unpacked row per example (row b =
    example offset + b; the last chunk is padded with repeats to a full batch)."""
    from tqdm.auto import tqdm

    for lo in tqdm(range(0, len(examples), batch_size), desc=desc, disable=not progress):
        chunk = examples[lo:lo + batch_size]
        rows = Batcher(chunk + chunk[:batch_size - len(chunk)], batch_size, seq_len, 0,
                       kind=kind, pack=False)
        rows._order = np.arange(len(rows.examples))  # keep the order: row b = example b
        yield lo, chunk, rows.next()


def _write_cache(cache_file: Optional[str], **arrays):
    """Writes a precompute cache (.npz) atomically, from process 0 only."""
    if not cache_file or jax.process_index() != 0:
        return
    os.makedirs(os.path.dirname(cache_file) or ".", exist_ok=True)
    tmp = cache_file + ".partial.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, cache_file)


def precompute_signals(examples, experts: Experts, e_params, vocab: int, seq_len: int,
                       batch_size: int, cache_file: Optional[str] = None, progress=True,
                       mesh=None, block: int = 0):
    """Attaches the frozen experts' per-target signals to every SFT example, reading them
    from `cache_file` (.npz) when it matches, else computing and writing it. Reused across
    epochs and restarts: the experts then never run inside the training step."""
    lengths = np.array([len(e.ids) - 1 for e in examples])
    total = int(lengths.sum())
    if cache_file and os.path.isfile(cache_file):
        z = np.load(cache_file)
        if z["lengths"].shape == lengths.shape and (z["lengths"] == lengths).all() and \
                z["ids_sum"] == sum(int(e.ids.sum()) for e in examples):
            offsets = np.r_[0, np.cumsum(lengths)]
            for i, e in enumerate(examples):
                e.signal_logprob = z["logprob"][offsets[i]:offsets[i + 1]]
                e.signal_top1 = z["top1"][offsets[i]:offsets[i + 1]]
            return examples
        log.warning("%s does not match the current data; recomputing", cache_file)
    fn = signals_program(experts, vocab, block, mesh, seq_len, batch_size)
    for _, chunk, rows in _in_order_batches(examples, batch_size, seq_len, "sft", progress,
                                            "expert signals"):
        lp, top1 = jax.device_get(fn(e_params, rows))
        for b, e in enumerate(chunk):
            n = len(e.ids) - 1
            e.signal_logprob = np.ascontiguousarray(lp[:, b, :n].T)
            e.signal_top1 = np.ascontiguousarray(top1[:, b, :n].T)
    _write_cache(cache_file, lengths=lengths, ids_sum=sum(int(e.ids.sum()) for e in examples),
                 logprob=np.concatenate([e.signal_logprob for e in examples]) if total else
                 np.zeros((0, experts.n), np.float32),
                 top1=np.concatenate([e.signal_top1 for e in examples]) if total else
                 np.zeros((0, experts.n), np.int32))
    return examples


def signals_program(experts: Experts, vocab: int, block: int, mesh, seq_len: int,
                    batch_size: int):
    """make_signals_fn jitted: expert params sharded by the rules (as loaded), the batch's
    rows over data/fsdp, traced on `mesh` (activation pins); no mesh: one device."""
    fn = make_signals_fn(experts, vocab, block)
    if mesh is None:
        return jax.jit(fn)
    b_sh = sh.batch_sharding(mesh, (batch_size, seq_len))
    return jax.jit(sh.traced_on(fn, mesh),
                   in_shardings=(sh.param_shardings(experts, mesh),
                                 {k: b_sh for k in SFT_FIELDS}),
                   out_shardings=sh.NamedSharding(mesh, sh.P(None, *b_sh.spec)))


SFT_FIELDS = ("tokens", "positions", "segment_ids", "targets", "loss_mask")


def sft_loss_fn(router: Router, experts: Experts, vocab: int, stage_cfg, block: int = 0):
    """(params, frozen, batch) -> (loss, metrics): L_route + lm_weight * L_lm."""
    def loss_fn(params, frozen, batch):
        lm_stats, route_logits = router_outputs(router, params, batch, vocab, block)
        targets = batch["targets"]
        if "signal_logprob" in batch:  # precomputed: [B, T, n] -> [n, B, T]
            target_lp = jnp.moveaxis(batch["signal_logprob"], -1, 0)
            top1 = jnp.moveaxis(batch["signal_top1"], -1, 0)
        else:
            target_lp, top1 = expert_signals_online(experts, frozen["experts"], batch, vocab,
                                                    block)
        signals = losses.ExpertSignals(jax.lax.stop_gradient(target_lp), top1)
        return losses.sft_loss(lm_stats, route_logits, targets, batch["loss_mask"], signals,
                               stage_cfg.lm_weight, stage_cfg.routing_loss)
    return loss_fn


def _reference(router: Router, experts: Experts, vocab: int, block: int, ref_params,
               e_params, e_hidden, side):
    """The stage-1 router's side of CDPO on one side of the pairs: (sequence log-prob of
    the fused policy under it [B], its routing logits [B, T, n] float32)."""
    out = router.forward(ref_params, side["tokens"], side["positions"], side["segment_ids"],
                         with_logits=False)
    route = out.route_logits.astype(jnp.float32)
    stats = fused_stats(router, ref_params, out.hidden, experts, e_params, e_hidden,
                        jnp.argmax(route, axis=-1), side["targets"], vocab, block)
    return losses.sequence_logprob(stats.logprob, side["loss_mask"]), route


def cdpo_loss_fn(router: Router, experts: Experts, vocab: int, stage_cfg, block: int = 0):
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
    """
    def seq_logprobs(params, frozen, side):
        e_params = frozen["experts"]
        args = (side["tokens"], side["positions"], side["segment_ids"])
        e_hidden = experts.hidden(e_params, *args)
        if "ref_logprob" in side:
            ref, ref_route = side["ref_logprob"], side["ref_route_logits"]
        else:
            ref, ref_route = _reference(router, experts, vocab, block, frozen["ref"], e_params,
                                        e_hidden, side)
        ref_route = jax.lax.stop_gradient(ref_route)
        pol_out = router.forward(params, *args, with_logits=False)
        pol = losses.sequence_logprob(
            fused_stats(router, params, pol_out.hidden, experts, e_params, e_hidden,
                        jnp.argmax(ref_route, axis=-1), side["targets"], vocab,
                        block).logprob, side["loss_mask"])
        kl = losses.routing_kl(ref_route, pol_out.route_logits, side["loss_mask"])
        return pol, jax.lax.stop_gradient(ref), kl

    def loss_fn(params, frozen, batch):
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


def reference_program(router: Router, experts: Experts, vocab: int, block: int, mesh,
                      seq_len: int, batch_size: int):
    """(stage-1 router params, expert params, side rows) -> (ref_logprob [B],
    ref_route_logits [B, T, n]) jitted like signals_program: the CDPO reference, once."""
    def fn(ref_params, e_params, side):
        e_hidden = experts.hidden(e_params, side["tokens"], side["positions"],
                                  side["segment_ids"])
        return _reference(router, experts, vocab, block, ref_params, e_params, e_hidden, side)
    if mesh is None:
        return jax.jit(fn)
    b_sh = sh.batch_sharding(mesh, (batch_size, seq_len))
    return jax.jit(sh.traced_on(fn, mesh),
                   in_shardings=(sh.param_shardings(router, mesh),
                                 sh.param_shardings(experts, mesh),
                                 {k: b_sh for k in SFT_FIELDS}),
                   out_shardings=(sh.batch_sharding(mesh, (batch_size,)), b_sh))


def params_fingerprint(params) -> np.ndarray:
    """Sum and sum of squares of every leaf (float32, [2 x leaves]): what a cache computed
    from these params is keyed by."""
    f = jax.jit(lambda p: jnp.stack([jnp.stack([jnp.sum(x.astype(jnp.float32)),
                                                jnp.sum(jnp.square(x.astype(jnp.float32)))])
                                     for x in jax.tree.leaves(p)]))
    return np.asarray(jax.device_get(f(params))).ravel()


def precompute_reference(examples, router: Router, ref_params, experts: Experts, e_params,
                         vocab: int, seq_len: int, batch_size: int,
                         cache_file: Optional[str] = None, progress=True, mesh=None,
                         block: int = 0):
    """Attaches the stage-1 router's CDPO reference (sequence log-prob of each side and its
    routing logits) to every preference pair, from `cache_file` (.npz) when it matches the
    data and the router's params, else computed and written. The step then holds neither
    the reference router nor its forward pass."""
    sides = ("chosen", "rejected")
    lengths = np.array([[len(e.prompt) + len(getattr(e, s)) - 1 for s in sides]
                        for e in examples]).reshape(-1, 2)
    ids_sum = sum(int(e.prompt.sum() + e.chosen.sum() + e.rejected.sum()) for e in examples)
    fingerprint = params_fingerprint(ref_params)

    def attach(logprob, route):
        offsets = np.r_[0, np.cumsum(lengths.ravel())]
        for i, e in enumerate(examples):
            e.ref_logprob = logprob[i]
            e.ref_route = tuple(route[offsets[2 * i + j]:offsets[2 * i + j + 1]]
                                for j in range(2))
        return examples

    if cache_file and os.path.isfile(cache_file):
        z = np.load(cache_file)
        if (z["lengths"].shape == lengths.shape and (z["lengths"] == lengths).all()
                and z["ids_sum"] == ids_sum and z["fingerprint"].shape == fingerprint.shape
                and (z["fingerprint"] == fingerprint).all()):
            return attach(z["logprob"], z["route"])
        log.warning("%s does not match the current data or stage-1 router; recomputing",
                    cache_file)
    fn = reference_program(router, experts, vocab, block, mesh, seq_len, batch_size)
    logprob = np.zeros((len(examples), 2), np.float32)
    routes = [[None, None] for _ in examples]
    for lo, chunk, batch in _in_order_batches(examples, batch_size, seq_len, "pref", progress,
                                              "CDPO reference"):
        for j, s in enumerate(sides):
            side = {k: batch[s][k] for k in SFT_FIELDS}
            lp, route = jax.device_get(fn(ref_params, e_params, side))
            for b in range(len(chunk)):
                logprob[lo + b, j] = lp[b]
                routes[lo + b][j] = np.asarray(route[b, :lengths[lo + b, j]], np.float32)
    n = router.n_experts
    route = np.concatenate([r for pair in routes for r in pair]) if routes else \
        np.zeros((0, n), np.float32)
    _write_cache(cache_file, lengths=lengths, ids_sum=ids_sum, fingerprint=fingerprint,
                 logprob=logprob, route=route)
    return attach(logprob, route)


def lm_loss_fn(model, vocab: int, block: int = 0):
    """(params, frozen, batch) -> (loss, metrics): next-token cross-entropy of one plain
    model on the response tokens (stage `lm`; `frozen` is empty)."""
    def loss_fn(params, frozen, batch):
        del frozen
        stats = model_token_stats(model, params, batch, vocab, block)
        loss, acc = losses.lm_loss_from_stats(stats, batch["targets"], batch["loss_mask"])
        return loss, {"loss": loss, "lm_loss": loss, "token_accuracy": acc}
    return loss_fn


def make_train_step(loss_fn, tx, accum: int = 1, unroll: bool = False):
    """One optimizer update over a global batch [B, ...], split into `accum` micro-batches
    (`micro_batches`) whose gradients (w.r.t. the router params only) are summed in float32
    by a scan, so the activations alive at once are one micro-batch's; the update uses
    their mean. Metrics are the micro-batches' means."""
    def micro(params, frozen, batch):
        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, frozen, batch)
        return grads, metrics

    def train_step(state: TrainState, frozen, batch):
        if accum == 1:
            grads, metrics = micro(state.params, frozen, batch)
        else:
            batch = micro_batches(batch, accum)
            def body(acc, mb):
                g, m = micro(state.params, frozen, mb)
                return jax.tree.map(lambda a, b: a + b.astype(jnp.float32), acc, (g, m)), None
            zeros = jax.eval_shape(micro, state.params, frozen,
                                   jax.tree.map(lambda x: x[0], batch))
            zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), zeros)
            (grads, metrics), _ = jax.lax.scan(body, zeros, batch,
                                               unroll=accum if unroll else 1)
            grads, metrics = jax.tree.map(lambda x: x / accum, (grads, metrics))
            grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = dict(metrics, grad_norm=optax.global_norm(grads))
        step = state.step + 1
        return state.replace(params=params, opt_state=opt_state, step=step,
                             micro=step * accum), metrics
    return train_step


# ---------------------------------------------------------------------------- sharded stage
@dataclasses.dataclass
class Stage:
    """Everything one training stage needs: jitted steps, shardings, optimizer."""

    name: str
    trainee: object  # the Router (sft, cdpo) or the Model (lm) being trained
    experts: Experts
    mesh: object
    tx: optax.GradientTransformation
    schedule: Callable
    loss_fn: Callable
    state_shardings: TrainState
    frozen_shardings: dict
    accum: int

    def batch_shardings(self, batch):
        """[rows, ...] arrays: rows over data/fsdp."""
        return jax.tree.map(lambda x: sh.batch_sharding(self.mesh, x.shape), batch)

    def put_batch(self, batch):
        """Global host batch -> sharded device arrays (each host fills only its shards)."""
        def put(x, sharding):
            return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])
        return jax.tree.map(put, batch, self.batch_shardings(batch))

    def jitted(self, batch_example):
        """(train step, eval step) for batches shaped like `batch_example` ([B, ...] arrays
        or ShapeDtypeStructs), jitted with shardings and traced on the stage's mesh."""
        b_sh = self.batch_shardings(batch_example)
        step = make_train_step(self.loss_fn, self.tx, self.accum,
                               unroll=self.trainee.cfg.scan_unroll)
        train = jax.jit(sh.traced_on(step, self.mesh),
                        in_shardings=(self.state_shardings, self.frozen_shardings, b_sh),
                        out_shardings=(self.state_shardings, None), donate_argnums=(0,))
        evaluate = jax.jit(sh.traced_on(lambda params, frozen, batch:
                                        self.loss_fn(params, frozen, batch)[1], self.mesh),
                           in_shardings=(self.state_shardings.params, self.frozen_shardings,
                                         b_sh))
        return train, evaluate


def micro_batches(batch, accum: int):
    """A global batch [B, ...] -> [accum, B / accum, ...]: micro-batch j holds rows j,
    j + accum, j + 2 accum, ... Every device's block of rows is split in place (no rows
    move between devices) and every micro-batch keeps rows on every device."""
    def split(x):
        x = jnp.moveaxis(x.reshape((-1, accum) + x.shape[1:]), 1, 0)
        return sh.constrain(x, (None, "batch") + (None,) * (x.ndim - 2))
    return jax.tree.map(split, batch)


def build_stage(name, trainee, experts, mesh, stage_cfg, train_cfg, params, frozen, vocab):
    """`trainee` is the Router for stages sft / cdpo, a plain Model for stage lm. `params`
    and `frozen` may be arrays or ShapeDtypeStructs (fr_jax.plan compiles from shapes)."""
    accum = max(train_cfg.grad_accum, 1)
    if train_cfg.batch_size % accum:
        raise ValueError(f"train.batch_size={train_cfg.batch_size} is not a multiple of "
                         f"train.grad_accum={accum}: the global batch is split into grad_accum "
                         "equal micro-batches")
    block = train_cfg.loss_block
    if name == "lm":
        fn = lm_loss_fn(trainee, vocab, block)
    else:
        fn = (sft_loss_fn if name == "sft" else cdpo_loss_fn)(trainee, experts, vocab, stage_cfg,
                                                               block)
    tx, schedule = make_optimizer(stage_cfg, train_cfg, params, frozen_head=name == "cdpo")
    p_sh = sh.param_shardings(trainee, mesh)
    opt_shapes = jax.eval_shape(tx.init, params)
    opt_sh = _opt_shardings(tx, opt_shapes, p_sh, mesh)
    rep = sh.replicated(mesh)
    state_sh = TrainState(step=rep, micro=rep, params=p_sh, opt_state=opt_sh, rng=rep)
    frozen_sh = {"experts": sh.param_shardings(experts, mesh)} if "experts" in frozen else {}
    if "ref" in frozen:
        frozen_sh["ref"] = p_sh
    return Stage(name, trainee, experts, mesh, tx, schedule, fn, state_sh, frozen_sh, accum)


def _opt_shardings(tx, opt_shapes, p_sh, mesh):
    """Optimizer state sharded like the params it mirrors (Adam's mu and nu); the rest
    (counters, accumulation step) replicated."""
    rep = sh.replicated(mesh)
    masked = lambda x: isinstance(x, optax.MaskedNode)  # frozen params: no state at all
    return optax.tree_map_params(tx, lambda v, s: v if masked(v) else s, opt_shapes, p_sh,
                                 transform_non_params=lambda _: rep, is_leaf=masked)


def abstract_state(stage: Stage, params) -> TrainState:
    """The TrainState `init_state` would build, as ShapeDtypeStructs with its shardings
    (ahead-of-time compilation: fr_jax.plan)."""
    def make(p):
        key = jax.random.key_data(jax.random.key(0))
        return TrainState(jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32), p,
                          stage.tx.init(p), key)
    shapes = jax.eval_shape(make, params)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        shapes, stage.state_shardings)


def micro_batch_size(train_cfg) -> int:
    """Rows per micro-batch: the global batch split into grad_accum equal parts."""
    return train_cfg.batch_size // max(train_cfg.grad_accum, 1)


def trained_cfg(cfg, config):
    """The ModelConfig of a model being trained: config.model's rematerialisation and
    attention kernel, and attention over all queries at once (blocks would each keep
    their residuals)."""
    return cfg.replace(remat=config.model.remat, attn_block=0,
                       attention=config.model.attention)


def frozen_cfg(cfg, config):
    """The ModelConfig of a frozen expert in training: config.model's attention kernel for
    its whole-row forwards (signals, CDPO's fused policy)."""
    return cfg.replace(attention=config.model.attention)


def init_state(stage: Stage, params, seed: int) -> TrainState:
    """A fresh state holding its own copy of `params` (the step donates the state; the
    caller's arrays stay valid)."""
    params = jax.jit(lambda p: jax.tree.map(jnp.copy, p),
                     out_shardings=stage.state_shardings.params)(params)
    opt_state = jax.jit(stage.tx.init, out_shardings=stage.state_shardings.opt_state)(params)
    rng = jax.device_put(jax.random.key_data(jax.random.key(seed)),
                         stage.state_shardings.rng)
    zero = jax.device_put(jnp.zeros((), jnp.int32), stage.state_shardings.step)
    return TrainState(step=zero, micro=zero, params=params, opt_state=opt_state, rng=rng)


# ---------------------------------------------------------------------------- the loop
def _split(examples, fraction: float, seed: int):
    """Deterministic (train, eval) split of a list of examples."""
    if fraction <= 0 or len(examples) < 2:
        return examples, []
    order = np.random.default_rng([seed, 12345]).permutation(len(examples))
    n_eval = max(1, int(round(len(examples) * fraction)))
    return [examples[i] for i in order[n_eval:]], [examples[i] for i in order[:n_eval]]


def _scalars(metrics) -> Dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if np.ndim(v) == 0}


class _Writer:
    """tensorboardX on process 0 only; a no-op elsewhere."""

    def __init__(self, logdir: str):
        self.w = None
        if jax.process_index() == 0:
            from tensorboardX import SummaryWriter
            self.w = SummaryWriter(logdir)

    def scalars(self, prefix, values, step):
        if self.w:
            for k, v in values.items():
                self.w.add_scalar(f"{prefix}/{k}", v, step)

    def histogram(self, tag, values, step):
        if self.w:
            self.w.add_histogram(tag, np.asarray(values), step)

    def text(self, tag, text, step):
        if self.w:
            self.w.add_text(tag, text, step)

    def close(self):
        if self.w:
            self.w.close()


def _tokens_in(batch) -> int:
    sides = [batch["chosen"], batch["rejected"]] if "chosen" in batch else [batch]
    return int(sum((s["segment_ids"] > 0).sum() for s in sides))


def run_stage(name: str, config, trainee, params, experts: Optional[Experts], e_params,
              tokenizer, mesh, progress: bool = True):
    """Trains one stage to its configured number of steps (resuming if a checkpoint exists)
    and returns (params, history). `trainee` is the Router (sft, cdpo) or, for stage `lm`,
    the plain Model trained on the SFT data (no experts)."""
    from tqdm.auto import tqdm

    from fr_jax.checkpoint import Checkpointer, abstract_like

    tc, dc = config.train, config.data
    stage_cfg = tc[name]
    vocab = len(tokenizer)
    workdir = os.path.join(tc.workdir, name)
    if name in ("sft", "lm"):
        examples, report = tokenize_sft(load_records(dc.sft_path), tokenizer, dc.seq_len, dc.chat)
        kind = "sft"
    else:
        examples, report = tokenize_pref(load_records(dc.pref_path), tokenizer, dc.seq_len,
                                         dc.chat)
        kind = "pref"
    precomputed = name == "sft" and stage_cfg.expert_signals == "precompute"
    if precomputed:
        examples = precompute_signals(
            examples, experts, e_params, vocab, dc.seq_len, micro_batch_size(tc),
            stage_cfg.signals_cache or os.path.join(workdir, "expert_signals.npz"), progress,
            mesh, tc.loss_block)
    elif name == "sft" and stage_cfg.expert_signals != "online":
        raise SystemExit(f"train.sft.expert_signals must be 'online' or 'precompute', got "
                         f"{stage_cfg.expert_signals!r}")
    reference = name == "cdpo" and stage_cfg.reference == "precompute"
    if name == "cdpo" and stage_cfg.reference not in ("online", "precompute"):
        raise SystemExit(f"train.cdpo.reference must be 'online' or 'precompute', got "
                         f"{stage_cfg.reference!r}")
    # The stage-1 router, frozen in the frozen models' dtype: CDPO's reference policy.
    ref_params = (jax.tree.map(lambda x: x.astype(frozen_dtype(config)), params)
                  if name == "cdpo" else None)
    if reference:
        examples = precompute_reference(
            examples, trainee, ref_params, experts, e_params, vocab, dc.seq_len,
            micro_batch_size(tc),
            stage_cfg.reference_cache or os.path.join(workdir, "reference.npz"), progress,
            mesh, tc.loss_block)
    train_ex, eval_ex = _split(examples, dc.eval_fraction, dc.seed)
    _print(f"[{name}] data: {report}; {len(train_ex)} train / {len(eval_ex)} eval")
    batcher = Batcher(train_ex, tc.batch_size, dc.seq_len, dc.seed, kind, dc.pack)

    # Precomputed signals: the experts stay off the step (their HBM is free for it);
    # a precomputed reference: so does the stage-1 router.
    frozen = {"experts": e_params} if name != "lm" and not precomputed else {}
    if name == "cdpo" and not reference:
        frozen["ref"] = ref_params
    stage = build_stage(name, trainee, experts, mesh, stage_cfg, tc, params, frozen, vocab)
    state = init_state(stage, params, tc.seed)
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=tc.keep)
    if tc.resume:
        restored = ckpt.restore_latest(abstract_like(state, stage.state_shardings))
        if restored is not None:
            state, meta, at = restored
            batcher.restore(meta["data"])
            _print(f"[{name}] resumed from step {at} (epoch {batcher.epoch}, "
                   f"example {batcher.index})")
    frozen = jax.device_put(frozen, stage.frozen_shardings)
    first = batcher.next()
    train_step, eval_step = stage.jitted(first)
    writer = _Writer(os.path.join(tc.workdir, "tensorboard", name))
    writer.text("config", "<pre>" + config.to_json_best_effort(indent=2) + "</pre>", 0)

    sampler = _make_sampler(trainee, experts, e_params, tokenizer, eval_ex or train_ex,
                            names=None) if tc.sample_every and name != "lm" else None
    # One loop iteration = one optimizer update over train.batch_size rows (grad_accum
    # micro-batches inside the step); logging, evaluation and checkpoints count updates.
    total = stage_cfg.steps
    micro = int(state.step)
    bar = tqdm(total=total, initial=micro, desc=name, disable=not progress or
               jax.process_index() != 0, dynamic_ncols=True)
    batch, t_last, tokens_since, micro_last = first, time.perf_counter(), 0, micro
    history = []
    while micro < total:
        state, metrics = train_step(state, frozen, stage.put_batch(batch))
        micro += 1
        tokens_since += _tokens_in(batch)
        bar.update(1)
        if micro % tc.log_every == 0 or micro == total:
            metrics = jax.device_get(metrics)
            now = time.perf_counter()
            values = _scalars(metrics)
            values.update(lr=float(stage.schedule(micro)),
                          tokens_per_s=tokens_since / (now - t_last),
                          step_time=(now - t_last) / (micro - micro_last))
            if "route_share" in metrics:  # per-expert share of the tokens routed to it
                writer.histogram("train/route_share", metrics["route_share"], micro)
                values.update({f"route_share_{i}": float(v)
                               for i, v in enumerate(metrics["route_share"])})
            writer.scalars("train", values, micro)
            history.append({"micro": micro, **values})
            bar.set_postfix(loss=f"{values['loss']:.3f}")
            t_last, tokens_since, micro_last = now, 0, micro
        if tc.eval_every and eval_ex and (micro % tc.eval_every == 0 or micro == total):
            ev = evaluate(stage, eval_step, state.params, frozen, eval_ex, tc, dc, kind)
            writer.scalars("eval", ev, micro)
            if history:
                history[-1].update({f"eval_{k}": v for k, v in ev.items()})
        if sampler is not None and (micro % tc.sample_every == 0 or micro == total):
            writer.text("samples", sampler(state.params), micro)
        if micro % tc.ckpt_every == 0 or micro == total:
            ckpt.save(micro, state, {"data": batcher.state(), "stage": name, "micro": micro})
        if micro < total:
            batch = batcher.next()
    bar.close()
    writer.close()
    ckpt.close()
    with open(os.path.join(workdir, "history.json"), "w") as f:
        json.dump(history, f, indent=1)
    return state.params, history


def _make_sampler(router, experts, e_params, tokenizer, examples, names, n: int = 2,
                  max_new_tokens: int = 32):
    """params -> Markdown text: greedy FusionRoute answers to a few held-out prompts, each
    token tagged with the expert that produced it (TensorBoard text)."""
    from fr_jax.decode import FusedDecoder
    from fr_jax.fusion import Mode
    from fr_jax.trace import render_text

    prompts = [(e.prompt if hasattr(e, "prompt") else e.ids[e.response == 0]).tolist()
               for e in examples[:n]]
    decoder = FusedDecoder(Mode.parse("fusionroute"), router, experts, vocab=len(tokenizer),
                           chunk=8)
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    labels = names or [f"expert{i}" for i in range(experts.n)]

    def sample(params) -> str:
        res = decoder.generate({"router": params, "experts": e_params}, prompts,
                               max_new_tokens, eos, tokenizer.pad_token_id or 0)
        lines = []
        for row, p in enumerate(prompts):
            toks, chosen = res.row(row)
            pieces = [tokenizer.decode([t]) for t in toks]
            lines.append(f"**{tokenizer.decode(p)}**\n\n`{render_text(pieces, chosen, labels)}`")
        return "\n\n".join(lines)
    return sample


def evaluate(stage, eval_step, params, frozen, eval_ex, tc, dc, kind) -> Dict[str, float]:
    """Mean metrics over the first `eval_batches` batches of the held-out split."""
    batcher = Batcher(eval_ex, tc.batch_size, dc.seq_len, dc.seed, kind, dc.pack)
    sums: Dict[str, float] = {}
    n = 0
    while n < tc.eval_batches and batcher.epoch == 0:
        m = _scalars(jax.device_get(eval_step(params, frozen,
                                              stage.put_batch(batcher.next()))))
        for k, v in m.items():
            sums[k] = sums.get(k, 0.0) + v
        n += 1
        if batcher.index >= len(eval_ex):
            break
    return {k: v / max(n, 1) for k, v in sums.items()}


def _print(msg):
    if jax.process_index() == 0:
        print(msg, flush=True)


def maybe_initialize_distributed(mode: str = "auto"):
    """`jax.distributed.initialize()` on multi-host launches (a no-op on one host)."""
    multi = bool(os.environ.get("JAX_COORDINATOR_ADDRESS")) or \
        len([h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1
    if mode == "yes" or (mode == "auto" and multi):
        jax.distributed.initialize()


def run_lm(config, progress: bool = True) -> str:
    """Stage `lm`: fine-tunes one ordinary model (no routing) from `train.lm.init` on the SFT
    data -- the direct fine-tuning baseline, and how the demo world trains its experts.
    Returns the folder of the exported HF checkpoint (<workdir>/lm/model)."""
    from fr_jax.hf import load_config, load_hf, load_tokenizer, save_hf
    from fr_jax.models import Model

    init = config.train.lm.init
    if not init:
        raise SystemExit("stage lm fine-tunes an existing model: set --config.train.lm.init "
                         "to its HF folder")
    mesh = sh.mesh_from_config(config.mesh)
    dtype, pdtype = config.model.dtype, config.model.param_dtype or None
    model = Model(trained_cfg(load_config(init, dtype, pdtype), config))
    tokenizer = load_tokenizer(init)
    _, params = load_hf(init, dtype, pdtype, shardings=sh.param_shardings(model, mesh))
    params, _ = run_stage("lm", config, model, params, None, None, tokenizer, mesh, progress)
    out = os.path.join(config.train.workdir, "lm", "model")
    if jax.process_index() == 0:
        save_hf(out, model.cfg, jax.device_get(params), tokenizer=tokenizer)
        _print(f"[lm] exported model to {out}")
    return out


def run(config, progress: bool = True) -> str:
    """Both stages as configured; returns the folder of the exported router."""
    from fr_jax.decode import check_tokenizers
    from fr_jax.experts import load_experts
    from fr_jax.hf import load_tokenizer
    from fr_jax.router import load_router, save_router
    from fr_jax.toy.demo import bundled_world, ensure_world_data
    from fr_jax.toy.tiny import default_home

    maybe_initialize_distributed(config.train.distributed)
    tc = config.train
    if "lm" in tc.stages:
        if tuple(tc.stages) != ("lm",):
            raise SystemExit("stage lm trains one plain model and runs on its own "
                             f"(train.stages=('lm',)), got {tuple(tc.stages)}")
        return run_lm(config, progress)
    router_path, expert_paths = config.router.path, list(config.experts.paths)
    if not router_path and not expert_paths:
        # The bundled toy world: a fresh router (from its pretrained base) for its experts,
        # on the world's data (written once under $FR_JAX_HOME).
        world = bundled_world()
        router_path, expert_paths = world["router_base"], world["experts"]
        data = ensure_world_data(default_home())
        with config.unlocked():
            config.data.sft_path = config.data.sft_path or data["sft"]
            config.data.pref_path = config.data.pref_path or data["pref"]
    if not router_path or not expert_paths:
        raise SystemExit("set both --config.router.path and --config.experts.paths")
    mesh = sh.mesh_from_config(config.mesh)
    tokenizer = load_tokenizer(router_path)
    check_tokenizers([(p, load_tokenizer(p)) for p in [router_path] + expert_paths])
    dtype, pdtype = config.model.dtype, config.model.param_dtype or None
    router, r_params = load_router(router_path, n_experts=len(expert_paths), seed=tc.seed,
                                   dtype=dtype, param_dtype=pdtype,
                                   shardings_fn=lambda r: sh.param_shardings(r, mesh))
    router = Router(trained_cfg(router.cfg, config), router.n_experts)
    experts, e_params = load_experts(expert_paths, dtype, frozen_dtype(config),
                                     vocab=len(tokenizer),
                                     shardings_fn=lambda e: sh.param_shardings(e, mesh))
    experts = Experts([frozen_cfg(c, config) for c in experts.cfgs], vocab=experts.vocab,
                      stacked=experts.stacked)
    os.makedirs(tc.workdir, exist_ok=True)
    if jax.process_index() == 0:
        with open(os.path.join(tc.workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))
    names = list(config.experts.names) or [os.path.basename(os.path.normpath(p))
                                           for p in expert_paths]
    out = None
    for name in tc.stages:
        if name not in ("sft", "cdpo"):
            raise SystemExit(f"unknown training stage {name!r}; stages are 'sft', 'cdpo' "
                             "(the router) or 'lm' (one plain model, alone)")
        r_params, _ = run_stage(name, config, router, r_params, experts, e_params, tokenizer,
                                mesh, progress)
        out = os.path.join(tc.workdir, name, "router")
        if jax.process_index() == 0:
            save_router(out, router, r_params, tokenizer=tokenizer, expert_names=names)
            _print(f"[{name}] exported router to {out}")
    return out


def main(argv=None):
    from fr_jax.config import default_config_file, parse_flags
    from fr_jax.data import DataError
    from fr_jax.hf import CheckpointError
    from fr_jax.models import ConfigError

    logging.basicConfig(level=logging.WARNING)
    argv = list(sys.argv[1:] if argv is None else argv)
    fv = parse_flags(["fr_jax.train"] + argv, default_config_file("tiny.py"))
    try:
        return run(fv.config)
    except (CheckpointError, ConfigError, DataError) as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
