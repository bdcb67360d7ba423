"""One training stage on a mesh: the optimizer, the jitted (pjit) train and eval steps with
in/out shardings, in-step gradient accumulation, and the train state."""

from __future__ import annotations

import dataclasses
from typing import Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax

from fr_jax.routing.experts import Experts
from fr_jax.runtime import sharding as sh
from fr_jax.steps.objectives import cdpo_loss_fn, lm_loss_fn, sft_loss_fn


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


def make_eval_step(loss_fn, accum: int = 1):
    """The metrics of a global batch [B, ...] without gradients, over the same `accum`
    micro-batches as the train step (one micro-batch's activations alive at once: a whole
    batch's forward needs more memory than the train step), averaged as the train step
    averages them."""
    def eval_step(params, frozen, batch):
        if accum == 1:
            return loss_fn(params, frozen, batch)[1]
        def body(acc, mb):
            m = loss_fn(params, frozen, mb)[1]
            return jax.tree.map(lambda a, b: a + b.astype(jnp.float32), acc, m), None
        mbs = micro_batches(batch, accum)
        zeros = jax.eval_shape(lambda b: loss_fn(params, frozen, b)[1],
                               jax.tree.map(lambda x: x[0], mbs))
        zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), zeros)
        sums, _ = jax.lax.scan(body, zeros, mbs)
        return jax.tree.map(lambda x: x / accum, sums)
    return eval_step


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
        # Evaluation batches are the stage's own data only (CDPO's SFT rows are a training
        # term: its eval loss stays comparable across train.cdpo.sft_weight).
        eval_sh = {k: v for k, v in b_sh.items() if k != "sft"}
        evaluate = jax.jit(sh.traced_on(make_eval_step(self.loss_fn, self.accum), self.mesh),
                           in_shardings=(self.state_shardings.params, self.frozen_shardings,
                                         eval_sh))
        return train, evaluate


def micro_batches(batch, accum: int):
    """A global batch [B, ...] -> [accum, B / accum, ...]: micro-batch j holds rows j,
    j + accum, j + 2 accum, ... Every device's block of rows is split in place (no rows
    move between devices) and every micro-batch keeps rows on every device."""
    def split(x):
        x = jnp.moveaxis(x.reshape((-1, accum) + x.shape[1:]), 1, 0)
        return sh.constrain(x, (None, "batch") + (None,) * (x.ndim - 2))
    return jax.tree.map(split, batch)


def build_stage(name, trainee, experts, mesh, stage_cfg, train_cfg, params, frozen, vocab,
                sft_cfg=None):
    """`trainee` is the Router for stages sft / cdpo, a plain Model for stage lm. `params`
    and `frozen` may be arrays or ShapeDtypeStructs (fr_jax.plan compiles from shapes).
    `sft_cfg`: train.sft, the terms of CDPO's SFT term (train.cdpo.sft_weight)."""
    accum = max(train_cfg.grad_accum, 1)
    if train_cfg.batch_size % accum:
        raise ValueError(f"train.batch_size={train_cfg.batch_size} is not a multiple of "
                         f"train.grad_accum={accum}: the global batch is split into grad_accum "
                         "equal micro-batches")
    block = train_cfg.loss_block
    if name == "lm":
        fn = lm_loss_fn(trainee, vocab, block)
    elif name == "sft":
        fn = sft_loss_fn(trainee, experts, vocab, stage_cfg, block)
    else:
        fn = cdpo_loss_fn(trainee, experts, vocab, stage_cfg, block, sft_cfg)
    frozen_head = name == "cdpo" and stage_cfg.head == "frozen"
    tx, schedule = make_optimizer(stage_cfg, train_cfg, params, frozen_head=frozen_head)
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


def init_state(stage: Stage, params, seed: int, take: bool = False) -> TrainState:
    """A fresh state holding its own copy of `params` (the step donates the state; the
    caller's arrays stay valid), or with `take` the caller's arrays themselves (moved where
    the state's shardings put them): the run's one copy of the params."""
    if take:
        shardings = jax.tree.leaves(stage.state_shardings.params)
        leaves, tree = jax.tree.flatten(params)
        moved = []
        for x, s in zip(leaves, shardings):
            if x.sharding.is_equivalent_to(s, x.ndim):
                moved.append(x)
            else:
                moved.append(jax.device_put(x, s))
                x.delete()
        params = jax.tree.unflatten(tree, moved)
    else:
        params = jax.jit(lambda p: jax.tree.map(jnp.copy, p),
                         out_shardings=stage.state_shardings.params)(params)
    opt_state = jax.jit(stage.tx.init, out_shardings=stage.state_shardings.opt_state)(params)
    rng = jax.device_put(jax.random.key_data(jax.random.key(seed)),
                         stage.state_shardings.rng)
    zero = jax.device_put(jnp.zeros((), jnp.int32), stage.state_shardings.step)
    return TrainState(step=zero, micro=zero, params=params, opt_state=opt_state, rng=rng)
