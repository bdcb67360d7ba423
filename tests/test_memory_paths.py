"""The memory-saving paths of training against the simple ones they replace: blocked losses
against whole-sequence logits, rematerialised layers against stored activations, in-step
gradient accumulation against the mean of per-micro-batch gradients; and the activation
sharding pins on an 8-device mesh against one device."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from fr_jax.config import base_config
from fr_jax.corpus import Batcher, PrefExample, SFTExample
from fr_jax.routing.router import Router
from fr_jax.runtime import sharding as sh
from fr_jax.steps import losses
from fr_jax.steps import build_stage, init_state
from fixtures import build_world


def _sft_batch(n_experts=2, rows=4, seq=32, seed=0, signals=False):
    rng = np.random.default_rng(seed)
    examples = [SFTExample(rng.integers(3, 97, n).astype(np.int32),
                           np.r_[np.zeros(4), np.ones(n - 4)].astype(np.int32))
                for n in rng.integers(8, 20, 4 * rows)]
    if signals:
        for e in examples:
            e.signal_logprob = rng.normal(size=(len(e.ids) - 1, n_experts)).astype(np.float32)
            e.signal_top1 = rng.integers(0, 97, (len(e.ids) - 1, n_experts)).astype(np.int32)
    return Batcher(examples, rows, seq, seed=0).next()


def _pref_batch(rows=4, seq=32, seed=0):
    rng = np.random.default_rng(seed)
    ex = [PrefExample(rng.integers(3, 97, 5).astype(np.int32),
                      rng.integers(3, 97, 6).astype(np.int32),
                      rng.integers(3, 97, 4).astype(np.int32)) for _ in range(rows)]
    return Batcher(ex, rows, seq, seed=0, kind="pref").next()


@pytest.mark.parametrize("block", [1, 5, 8, 31])
def test_blocked_token_stats_equal_whole_logits(block):
    """Values and gradients of blocked log-probs equal those of [B, T, V] logits, for blocks
    that do and do not divide T (gemma-style soft-capped head)."""
    rng = np.random.default_rng(block)
    h = jnp.asarray(rng.normal(size=(3, 24, 16)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(16, 50)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 50, (3, 24)), jnp.int32)
    head = lambda w, h: 3.0 * jnp.tanh(h @ w / 3.0)

    def full(w, h):
        logits = head(w, h)
        return losses.token_logprob(logits, y), jnp.argmax(logits, -1)

    def blocked(w, h):
        st = losses.blocked_token_stats(lambda x: head(w, x), h, y, block)
        return st.logprob, st.argmax

    # Jitted: op by op, every primitive of the blocked loop compiles on its own.
    (lp_f, am_f), (lp_b, am_b) = jax.jit(full)(w, h), jax.jit(blocked)(w, h)
    np.testing.assert_allclose(lp_b, lp_f, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(am_b, am_f)
    g_f = jax.jit(jax.grad(lambda w, h: full(w, h)[0].sum(), argnums=(0, 1)))(w, h)
    g_b = jax.jit(jax.grad(lambda w, h: blocked(w, h)[0].sum(), argnums=(0, 1)))(w, h)
    for a, b in zip(g_b, g_f):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def _stage_loss_and_grads(name, block, remat="none", accum=1, batch=None, seed=0, **stage):
    router, r_params, experts, e_list = build_world("gemma2", n_experts=2, seed=seed)
    router = Router(router.cfg.replace(remat=remat), router.n_experts)
    cfg = base_config()
    cfg.train.batch_size, cfg.train.grad_accum, cfg.train.loss_block = 4, accum, block
    cfg.train[name].update(stage)
    e_params = experts.combine(e_list)
    frozen = {"experts": e_params}
    if name == "cdpo":
        frozen["ref"] = jax.tree.map(lambda x: x * 0.9, r_params)
    mesh = sh.make_mesh({}, devices=jax.devices()[:1])
    stage = build_stage(name, router, experts, mesh, cfg.train[name], cfg.train, r_params,
                        frozen, vocab=97)
    (loss, metrics), grads = jax.jit(jax.value_and_grad(stage.loss_fn, has_aux=True))(
        r_params, frozen, batch)
    return loss, metrics, grads, stage, r_params, frozen


@pytest.mark.slow  # 15-20 s each: the fast tier keeps under 6 min
@pytest.mark.parametrize("name", ["sft", "cdpo"])
def test_blocked_stage_losses_equal_whole_sequence_losses(name):
    """SFT (LM term, signals online) and CDPO (fused policy and reference) with loss_block
    equal today's whole-sequence losses to 1e-5: values, metrics and gradients."""
    batch = _sft_batch() if name == "sft" else _pref_batch()
    l0, m0, g0, *_ = _stage_loss_and_grads(name, 0, batch=batch)
    l1, m1, g1, *_ = _stage_loss_and_grads(name, 7, batch=batch)
    np.testing.assert_allclose(float(l1), float(l0), rtol=1e-5)
    for k in m0:
        np.testing.assert_allclose(np.asarray(m1[k]), np.asarray(m0[k]), rtol=1e-5, atol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), g1, g0)


@pytest.mark.slow
@pytest.mark.parametrize("positions", ["all", "informative"])
def test_the_fused_generator_term_in_the_step_equals_a_direct_computation(positions):
    """Stage 1 with lm_target=fused (signals precomputed, experts in the step): the step's
    fused NLL equals log_softmax(lsm q + lsm p_k) from whole-sequence logits of the router
    and every expert, k the routing head's argmax; blocked (7) equals whole (0), values and
    gradients."""
    batch = _sft_batch(signals=True)
    out = [_stage_loss_and_grads("sft", block, batch=batch, expert_signals="precompute",
                                 lm_target="fused", lm_positions=positions, lm_weight=1.0)
           for block in (0, 7)]
    (l0, m0, g0, stage, r_params, frozen), (l1, m1, g1, *_) = out
    args = (batch["tokens"], batch["positions"], batch["segment_ids"])
    r = stage.trainee.forward(r_params, *args)
    e_logits = stage.experts.forward(frozen["experts"], *args)  # [n, B, T, V]
    sel = np.asarray(jnp.argmax(r.route_logits, -1))
    e_k = np.take_along_axis(np.asarray(e_logits), sel[None, :, :, None], axis=0)[0]
    lsm = lambda x: np.asarray(jax.nn.log_softmax(jnp.asarray(x, jnp.float32), -1))
    f = lsm(lsm(np.asarray(r.logits)[..., :97]) + lsm(e_k[..., :97]))
    nll = -np.take_along_axis(f, np.asarray(batch["targets"])[..., None], -1)[..., 0]
    where = np.asarray(batch["loss_mask"]) > 0
    if positions == "informative":
        top1 = np.moveaxis(np.asarray(batch["signal_top1"]), -1, 0)
        where &= (top1 != top1[:1]).any(0)
    np.testing.assert_allclose(float(m0["fused_loss"]), nll[where].mean(), rtol=1e-4)
    np.testing.assert_allclose(float(l1), float(l0), rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), g1, g0)
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(g0["backbone"])) > 0


@pytest.mark.parametrize("remat", [pytest.param("dots", marks=pytest.mark.slow), "full"])
def test_rematerialised_layers_give_the_same_gradients(remat):
    batch = _sft_batch()
    l0, _, g0, *_ = _stage_loss_and_grads("sft", 0, batch=batch)
    l1, _, g1, *_ = _stage_loss_and_grads("sft", 0, remat=remat, batch=batch)
    np.testing.assert_allclose(float(l1), float(l0), rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), g1, g0)


@pytest.mark.slow  # 15-20 s: the fast tier keeps under 6 min
def test_grad_accumulation_applies_the_mean_of_micro_batch_gradients():
    """grad_accum=2 over a batch of 4 rows: one update with the mean of the gradients of
    the two 2-row micro-batches, rows (0, 2) and (1, 3) (checked against an optimizer step
    on that mean)."""
    batch = _sft_batch(signals=True)
    *_, stage, r_params, frozen = _stage_loss_and_grads("sft", 0, accum=2, batch=batch)
    assert stage.accum == 2
    halves = [jax.tree.map(lambda x: x[i::2], batch) for i in range(2)]
    # The reference, jitted once (op by op it compiles every primitive of the model).
    half_loss = jax.jit(lambda p, b: stage.loss_fn(p, frozen, b)[0])
    half_grad = jax.jit(jax.grad(half_loss))
    grads = [half_grad(r_params, h) for h in halves]
    mean = jax.tree.map(lambda a, b: (a + b) / 2, *grads)
    updates, _ = jax.jit(stage.tx.update)(mean, stage.tx.init(r_params), r_params)
    want = jax.tree.map(lambda p, u: p + u, r_params, updates)

    state = init_state(stage, r_params, seed=0)
    train, _ = stage.jitted(batch)
    state, metrics = train(state, jax.device_put(frozen, stage.frozen_shardings),
                           stage.put_batch(batch))
    assert int(state.step) == 1 and int(state.micro) == 2
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                 jax.device_get(state.params), want)
    per_half = [float(half_loss(r_params, h)) for h in halves]
    np.testing.assert_allclose(float(metrics["loss"]), np.mean(per_half), rtol=1e-5)


def test_batch_not_divisible_by_grad_accum_is_a_clear_error():
    router, r_params, experts, _ = build_world("llama", n_experts=2)
    cfg = base_config()
    cfg.train.batch_size, cfg.train.grad_accum = 6, 4
    with pytest.raises(ValueError, match="not a multiple of train.grad_accum"):
        build_stage("sft", router, experts, sh.make_mesh({}, devices=jax.devices()[:1]),
                    cfg.train.sft, cfg.train, r_params, {}, vocab=97)


def test_activation_pins_keep_rows_sharded():
    """On a data x fsdp x tensor mesh the residual stream stays sharded by rows (no
    replicated [B, T, E]), and the blocked SFT loss equals the one-device value."""
    batch = _sft_batch(rows=8)
    router, r_params, experts, e_list = build_world("llama", n_experts=2)
    cfg = base_config()
    cfg.train.batch_size, cfg.train.loss_block = 8, 8
    e_params = experts.combine(e_list)
    values = []
    for shape in ({}, {"data": 2, "fsdp": 2, "tensor": 2}):
        mesh = sh.make_mesh(shape, devices=jax.devices()[:1] if not shape else None)
        stage = build_stage("sft", router, experts, mesh, cfg.train.sft, cfg.train, r_params,
                            {"experts": e_params}, vocab=97)
        _, evaluate = stage.jitted(batch)
        frozen = jax.device_put({"experts": e_params}, stage.frozen_shardings)
        params = jax.device_put(r_params, stage.state_shardings.params)
        values.append(float(evaluate(params, frozen, stage.put_batch(batch))["loss"]))
        if shape:
            hlo = evaluate.lower(params, frozen, stage.put_batch(batch)).as_text()
            assert "sharding_constraint" in hlo or "Sharding" in hlo
    np.testing.assert_allclose(values[1], values[0], rtol=1e-5)


@pytest.mark.parametrize("model_type", ["llama", "gemma2"])
def test_long_prefill_attends_in_query_blocks_exactly(model_type):
    """A prompt longer than attn_block goes into the cache block by block: the same
    logits and cache as attending all of its queries at once (left padding, Gemma's window)."""
    from fr_jax.models import Model
    from fixtures import tiny

    cfg = tiny(model_type)
    params = Model(cfg).init(jax.random.key(0))
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(3, 97, (2, 11)), jnp.int32)
    mask = jnp.asarray(np.arange(11)[None, :] >= np.array([[0], [3]]))
    outs = []
    for block in (0, 4):
        model = Model(cfg.replace(attn_block=block))
        out, cache = model.prefill(params, tokens, model.init_cache(2, 16), mask)
        outs.append((out.logits, cache.k, cache.v))
        outs[-1] += (model.forward(params, tokens).logits,)
    for a, b in zip(*outs):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
