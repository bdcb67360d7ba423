"""CDPO with stage 1's loss kept on (train.cdpo.sft_weight, the paper's guard against
degenerate routing): the step's loss is CDPO's plus sft_weight x stage 1's, values and
gradients, each computed here on its own; with train.cdpo.head=sft the routing head learns
from the SFT term alone (the preference and routing-KL terms reach the LM part only), with
head=frozen not at all; the eval batches (pairs only) give CDPO's loss alone; a whole CDPO
run through `python -m fr_jax.train` trains with SFT rows, logs the term and resumes from
its checkpoint on the same SFT rows."""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from fr_jax.config import base_config
from fr_jax.corpus import Batcher, PrefExample, SFTExample
from fr_jax.runtime import sharding as sh
from fr_jax.steps import build_stage, init_state
from fr_jax.steps.objectives import cdpo_loss_fn, sft_loss_fn
from fixtures import build_world
from cli_env import REPO

VOCAB = 97
WEIGHT = 0.7


def _world():
    router, r_params, experts, e_list = build_world("llama", n_experts=2)
    e_params = experts.combine(e_list)
    # The policy moved away from the reference, so DPO and the routing KL are not flat.
    policy = jax.tree.map(lambda x: x * (1 + 0.05 * jax.random.normal(jax.random.key(3), ())),
                          r_params)
    rng = np.random.default_rng(0)
    ints = lambda n: rng.integers(3, VOCAB, n).astype(np.int32)
    pref = [PrefExample(ints(5), ints(6), ints(6)) for _ in range(8)]
    sft = [SFTExample(ints(n), np.r_[np.zeros(4), np.ones(n - 4)].astype(np.int32))
           for n in rng.integers(8, 20, 12)]
    batch = Batcher(pref, 4, 24, seed=1, kind="pref", pack=False).next()
    batch["sft"] = Batcher(sft, 4, 24, seed=2).next()
    return router, policy, r_params, experts, e_params, batch


def _configs(head: str, lm_target: str):
    cfg = base_config()
    cfg.train.cdpo.chosen_nll = 0.3
    cfg.train.cdpo.sft_weight, cfg.train.cdpo.head = WEIGHT, head
    cfg.train.sft.lm_target = lm_target
    alone = base_config().train.cdpo
    alone.chosen_nll = 0.3
    return cfg, alone


@pytest.mark.slow  # 25 s each, compile-bound: the fast tier keeps under 6 min
@pytest.mark.parametrize("head,lm_target", [("sft", "router"), ("frozen", "mix")])
def test_the_step_loss_is_cdpo_plus_weighted_sft_in_value_and_gradient(head, lm_target):
    router, policy, ref, experts, e_params, batch = _world()
    cfg, alone = _configs(head, lm_target)
    frozen = {"experts": e_params, "ref": ref}
    pairs = {k: v for k, v in batch.items() if k != "sft"}
    mixed = cdpo_loss_fn(router, experts, VOCAB, cfg.train.cdpo, 0, cfg.train.sft)
    cdpo = cdpo_loss_fn(router, experts, VOCAB, alone, 0)
    sft = sft_loss_fn(router, experts, VOCAB, cfg.train.sft, 0)  # signals online: no cache

    grad = lambda fn: jax.jit(jax.value_and_grad(fn, has_aux=True))
    (loss, m), g = grad(mixed)(policy, frozen, batch)
    (l_cdpo, m_cdpo), g_cdpo = grad(cdpo)(policy, frozen, pairs)
    (l_sft, m_sft), g_sft = grad(sft)(policy, {"experts": e_params}, batch["sft"])
    np.testing.assert_allclose(loss, l_cdpo + WEIGHT * l_sft, rtol=1e-5)
    assert m["loss"] == loss and m["sft_loss"] == pytest.approx(float(l_sft), rel=1e-6)
    for k in ("dpo_loss", "route_kl", "chosen_nll", "reward_margin"):
        np.testing.assert_allclose(m[k], m_cdpo[k], rtol=1e-5, err_msg=k)
    assert m_cdpo["route_kl"] > 0 and m_sft["route_loss"] > 0

    # float32 sums in another order: tolerances relative to each tensor's scale
    close = lambda a, b: jax.tree.map(lambda x, y: np.testing.assert_allclose(
        x, y, rtol=1e-4, atol=1e-4 * float(np.abs(y).max()) + 1e-8), a, b)
    close(g["backbone"], jax.tree.map(lambda a, b: a + WEIGHT * b, g_cdpo["backbone"],
                                      g_sft["backbone"]))
    head_cdpo = g_cdpo["head"]["kernel"]
    assert np.abs(head_cdpo).max() > 1e-6  # the routing KL does reach the head ...
    if head == "sft":  # ... unless only the SFT term may train it
        close(g["head"], jax.tree.map(lambda b: WEIGHT * b, g_sft["head"]))
    else:
        close(g["head"], jax.tree.map(lambda a, b: a + WEIGHT * b, g_cdpo["head"],
                                      g_sft["head"]))
    # Evaluation batches hold pairs only: CDPO's loss alone.
    l_eval, _ = jax.jit(mixed)(policy, frozen, pairs)
    np.testing.assert_allclose(l_eval, l_cdpo, rtol=1e-6)


@pytest.mark.slow
def test_head_sft_trains_the_routing_head_and_head_frozen_does_not():
    router, policy, ref, experts, e_params, batch = _world()
    mesh = sh.make_mesh({}, devices=jax.devices()[:1])
    moved = {}
    for head in ("sft", "frozen"):
        cfg, _ = _configs(head, "router")
        cfg.train.cdpo.lr, cfg.train.cdpo.warmup = 1e-2, 0
        frozen = {"experts": e_params, "ref": ref}
        stage = build_stage("cdpo", router, experts, mesh, cfg.train.cdpo, cfg.train, policy,
                            frozen, vocab=VOCAB, sft_cfg=cfg.train.sft)
        state = init_state(stage, policy, seed=0)
        train, evaluate = stage.jitted(batch)
        for _ in range(2):  # the schedule's first step has learning rate 0
            state, metrics = train(state, jax.device_put(frozen, stage.frozen_shardings),
                                   stage.put_batch(batch))
        assert {"sft_loss", "sft_route_loss", "sft_generator_loss"} <= set(metrics)
        moved[head] = {part: float(jax.tree.reduce(
            lambda a, b: a + b, jax.tree.map(lambda x, y: np.abs(x - y).sum(),
                                             state.params[part], policy[part])))
            for part in ("head", "backbone")}
        # The eval step takes the pairs alone (its shardings have no SFT rows).
        ev = evaluate(state.params, jax.device_put(frozen, stage.frozen_shardings),
                      stage.put_batch({k: v for k, v in batch.items() if k != "sft"}))
        assert "sft_loss" not in ev
    assert moved["sft"]["head"] > 0 and moved["frozen"]["head"] == 0
    assert moved["sft"]["backbone"] > 0 and moved["frozen"]["backbone"] > 0


def test_the_settings_are_refused_together_where_they_cannot_run(tmp_path):
    from fr_jax.train import main as train_main
    base = [f"--config={os.path.join(REPO, 'configs', 'tiny.py')}",
            f"--config.train.workdir={tmp_path / 'run'}"]
    with pytest.raises(SystemExit, match="head=sft trains the routing head.*sft_weight > 0"):
        train_main(base + ["--config.train.cdpo.head=sft"])
    with pytest.raises(SystemExit, match="sft_weight=0.5 keeps stage 1's loss on during CDPO"
                                         ".*data.sft_path='/nowhere/sft.jsonl' does not exist"):
        train_main(base + ["--config.train.cdpo.sft_weight=0.5",
                           "--config.data.sft_path=/nowhere/sft.jsonl",
                           "--config.train.stages=('cdpo',)"])
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_cdpo_run_with_the_sft_term_logs_it_and_resumes_on_the_same_rows(tmp_path):
    """configs/tiny.py's CDPO on the bundled router and experts with the SFT term
    (head=sft); then again from its step-6 checkpoint: the same history from there (the
    SFT rows' stream position travels in the checkpoint, or the resumed steps would see
    other rows)."""
    from fr_jax.runtime.bundle import bundled_world
    from fr_jax.toy.world_data import bundled_world_data
    from fr_jax.train import main as train_main
    os.environ["FR_JAX_HOME"] = str(tmp_path / "home")
    run, world, data = tmp_path / "run", bundled_world(), bundled_world_data()
    args = [f"--config={os.path.join(REPO, 'configs', 'tiny.py')}",
            f"--config.router.path={world['router']}",
            f"--config.experts.paths={tuple(world['experts'])!r}",
            f"--config.data.sft_path={data['sft']}", f"--config.data.pref_path={data['pref']}",
            f"--config.train.workdir={run}", "--config.train.stages=('cdpo',)",
            "--config.train.cdpo.steps=12", "--config.train.ckpt_every=6",
            "--config.train.log_every=3", "--config.train.eval_every=6",
            "--config.train.cdpo.sft_weight=0.5", "--config.train.cdpo.head=sft"]
    try:
        train_main(args)
        first = json.load(open(run / "cdpo" / "history.json"))
        assert all("sft_loss" in h and "sft_route_loss" in h for h in first)
        assert "eval_sft_loss" not in first[-1] and "eval_loss" in first[-1]
        report = json.load(open(run / "cdpo" / "sft_term_data_report.json"))
        assert report["path"].endswith(".jsonl")
        # Back to step 6: the last checkpoint dropped, the same command again.
        shutil.rmtree(run / "cdpo" / "checkpoints" / "12")
        train_main(args)
        again = json.load(open(run / "cdpo" / "history.json"))
        assert [h["micro"] for h in again] == [h["micro"] for h in first]
        for a, b in zip(first, again):
            assert a["sft_loss"] == pytest.approx(b["sft_loss"], rel=1e-4)
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
    finally:
        del os.environ["FR_JAX_HOME"]
