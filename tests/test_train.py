"""Training: sharded step == single-device step, checkpoints (other mesh, corrupt fallback),
and the tiny config end to end. (The CLI killed and resumed: tests/test_faults.py.)"""

import json
import os

import numpy as np
import pytest

import jax

from fr_jax.config import base_config
from fr_jax.corpus import Batcher, SFTExample
from fr_jax.loop.checkpoint import Checkpointer, abstract_like
from fr_jax.runtime import sharding as sh
from fr_jax.runtime.bundle import bundled_world
from fr_jax.steps import build_stage, init_state
from fixtures import build_world
from tb_events import read_events
from cli_env import REPO  # noqa: E402



def _sft_setup(mesh, n_experts=2):
    router, r_params, experts, e_list = build_world("llama", n_experts=n_experts)
    cfg = base_config()
    cfg.train.batch_size = 4
    cfg.train.sft.lr = 1e-3
    rng = np.random.default_rng(0)
    examples = [SFTExample(rng.integers(3, 97, n).astype(np.int32),
                           np.r_[np.zeros(4), np.ones(n - 4)].astype(np.int32))
                for n in rng.integers(8, 20, 16)]
    batch = Batcher(examples, 4, 32, seed=0).next()
    e_params = experts.combine(e_list)
    stage = build_stage("sft", router, experts, mesh, cfg.train.sft, cfg.train, r_params,
                        {"experts": e_params}, vocab=97)
    state = init_state(stage, r_params, seed=0)
    frozen = jax.device_put({"experts": e_params}, stage.frozen_shardings)
    return stage, state, frozen, batch


@pytest.mark.slow  # 20-30 s, compile-bound: the fast tier keeps under 6 min
def test_sharded_step_equals_single_device_step():
    """Two steps on a data x fsdp x tensor mesh equal two steps on one device: the loss, and
    the params after two AdamW steps.

    Where a gradient is itself reduction-order noise (|g| below 1e-4 of its tensor's median:
    cancellation in the sum over tokens, whose sign then depends on the order of the sum),
    AdamW's per-element normalisation turns it into a step of up to lr in either direction;
    those params are held to 2 steps x lr, every other one to atol 2e-5 / rtol 1e-4."""
    results = []
    for shape in ({}, {"data": 2, "fsdp": 2, "tensor": 2}):
        mesh = sh.make_mesh(shape, devices=jax.devices()[:1] if not shape else None)
        stage, state, frozen, batch = _sft_setup(mesh)
        grads = jax.jit(jax.grad(lambda p, f, b: stage.loss_fn(p, f, b)[0]))(
            state.params, frozen, stage.put_batch(batch))
        train, _ = stage.jitted(batch)
        for _ in range(2):
            state, metrics = train(state, frozen, stage.put_batch(batch))
        results.append((float(metrics["loss"]), jax.device_get(state.params), state,
                        jax.device_get(grads)))
    (loss1, p1, _, g1), (loss8, p8, state8, _) = results
    np.testing.assert_allclose(loss1, loss8, rtol=1e-5)
    lr = 1e-3  # _sft_setup's learning rate

    def check(a, b, g):
        noise = np.abs(g) < 1e-4 * np.median(np.abs(g))
        np.testing.assert_allclose(a[~noise], b[~noise], atol=2e-5, rtol=1e-4)
        assert np.all(np.abs(a[noise] - b[noise]) <= 2 * lr)
    jax.tree.map(check, p1, p8, g1)
    q = state8.params["backbone"]["layers"]["attn"]["q_proj"]["kernel"]  # [L, E, H, D]
    assert q.sharding.spec == sh.P(None, "fsdp", "tensor", None)
    mu = state8.opt_state[1][0].mu["backbone"]["layers"]["attn"]["q_proj"]["kernel"]
    assert mu.sharding.spec == q.sharding.spec  # optimizer state sharded like the params


@pytest.mark.slow
def test_checkpoint_restores_onto_another_mesh_and_skips_a_corrupt_one(tmp_path, caplog):
    mesh_a = sh.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    stage, state, frozen, batch = _sft_setup(mesh_a)
    train, _ = stage.jitted(batch)
    ckpt = Checkpointer(str(tmp_path / "ckpt"), keep=3)
    ckpt.save(1, state, {"data": {"epoch": 0, "index": 4}})
    state2, _ = train(state, frozen, stage.put_batch(batch))
    ckpt.save(2, state2, {"data": {"epoch": 0, "index": 8}})

    mesh_b = sh.make_mesh({"tensor": 4, "fsdp": 2})
    stage_b, fresh, _, _ = _sft_setup(mesh_b)
    state_b, meta, step = ckpt.restore_latest(abstract_like(fresh, stage_b.state_shardings))
    assert step == 2 and meta["data"]["index"] == 8
    q = state_b.params["backbone"]["layers"]["attn"]["q_proj"]["kernel"]
    assert q.sharding.mesh.shape == mesh_b.shape
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state2.params),
                 jax.device_get(state_b.params))

    # Damage every data file of step 2: restore falls back to step 1 with a warning.
    for root, _, files in os.walk(tmp_path / "ckpt" / "2" / "state"):
        for f in files:
            if not f.endswith(".json") and "manifest" not in f and "zarray" not in f:
                with open(os.path.join(root, f), "wb") as fh:
                    fh.write(b"garbage")
    ckpt2 = Checkpointer(str(tmp_path / "ckpt"), keep=3)
    with caplog.at_level("WARNING"):
        _, meta1, step1 = ckpt2.restore_latest(abstract_like(fresh, stage_b.state_shardings))
    assert step1 == 1 and meta1["data"]["index"] == 4
    assert "step 2" in caplog.text and "unreadable" in caplog.text


# ------------------------------------------------------------------------------ learning
def _token_toy(n_per_domain=24, n_new=10):
    """Two random experts; domain d's prompts start with marker token d+1 and its responses
    are expert d's own greedy continuation, so expert d is right at those positions."""
    from fr_jax.corpus import PrefExample
    from fr_jax.inference import Decoder

    router, r_params, experts, e_list = build_world("llama", n_experts=2)
    r_params["head"] = router.init_head(jax.random.key(7))  # an untrained, unsaturated head
    rng = np.random.default_rng(0)
    sft, pref = [], []
    for d in range(2):
        prompts = [[d + 1] + rng.integers(3, 97, 5).tolist() for _ in range(n_per_domain)]
        own, other = (Decoder(experts.models[0], chunk=n_new).generate(
            e_list[e], prompts, n_new, eos_ids=[]).tokens for e in (d, 1 - d))
        for p, good, bad in zip(prompts, own, other):
            ids = np.asarray(p + good.tolist(), np.int32)
            sft.append(SFTExample(ids, np.r_[np.zeros(len(p)), np.ones(n_new)].astype(np.int32)))
            pref.append(PrefExample(*(np.asarray(x, np.int32) for x in (p, good, bad))))
    return router, r_params, experts, experts.combine(e_list), sft, pref


def _train(stage_name, router, r_params, experts, e_params, examples, steps, lr, kind):
    cfg = base_config()
    cfg.train.batch_size = 8
    stage_cfg = cfg.train[stage_name]
    stage_cfg.lr, stage_cfg.warmup, stage_cfg.steps = lr, 2, steps
    mesh = sh.make_mesh({}, devices=jax.devices()[:1])
    frozen = {"experts": e_params}
    if stage_name == "cdpo":
        frozen["ref"] = r_params
    stage = build_stage(stage_name, router, experts, mesh, stage_cfg, cfg.train, r_params,
                        frozen, vocab=97)
    state = init_state(stage, r_params, seed=0)
    frozen = jax.device_put(frozen, stage.frozen_shardings)
    batcher = Batcher(examples, 8, 24, seed=0, kind=kind, pack=False)
    train, evaluate = stage.jitted(batcher.next())
    full = Batcher(examples, len(examples), 24, seed=0, kind=kind, pack=False).next()
    before = jax.device_get(evaluate(state.params, frozen, stage.put_batch(full)))
    for _ in range(steps):
        state, _ = train(state, frozen, stage.put_batch(batcher.next()))
    after = jax.device_get(evaluate(state.params, frozen, stage.put_batch(full)))
    return state.params, before, after


@pytest.mark.slow
def test_sft_learns_to_route_and_cdpo_prefers_chosen():
    router, r_params, experts, e_params, sft, pref = _token_toy()
    params, before, after = _train("sft", router, r_params, experts, e_params, sft, 80, 3e-3,
                                   "sft")
    assert after["lm_loss"] < 0.7 * before["lm_loss"]
    # The mixture likelihood is bounded by the right expert's own p(y) (about e^-3 here).
    assert after["route_loss"] < before["route_loss"] - 0.3
    assert before["informative_frac"] > 0.5
    assert before["route_acc"] < 0.6 and after["route_acc"] > 0.9  # chance is 0.5
    _, b2, a2 = _train("cdpo", router, params, experts, e_params, pref, 30, 1e-3, "pref")
    assert b2["pref_acc"] == 0.5 or abs(b2["reward_margin"]) < 1e-6  # policy == reference
    assert a2["pref_acc"] > 0.9 and a2["reward_margin"] > 0


# ------------------------------------------------------------------------------ CLI
@pytest.mark.slow
def test_tiny_config_trains_both_stages_and_the_decoder_loads_the_result(tmp_path, capsys):
    from fr_jax.decode import main as decode_main
    from fr_jax.runtime.bundle import bundled_world
    from fr_jax.train import main as train_main

    os.environ["FR_JAX_HOME"] = str(tmp_path / "home")
    try:
        exported = train_main(["--config=" + os.path.join(REPO, "configs", "tiny.py"),
                               f"--config.train.workdir={tmp_path / 'run'}",
                               "--config.train.sample_every=30"])
        sft = json.load(open(tmp_path / "run" / "sft" / "history.json"))
        cdpo = json.load(open(tmp_path / "run" / "cdpo" / "history.json"))
        assert sft[-1]["lm_loss"] < 0.8 * sft[0]["lm_loss"]
        assert sft[-1]["route_loss"] < sft[0]["route_loss"]
        assert cdpo[-1]["reward_margin"] > cdpo[0]["reward_margin"]
        # What `tensorboard --logdir <workdir>/tensorboard` shows, read with its own reader.
        sft_tb = read_events(tmp_path / "run" / "tensorboard" / "sft")
        scalars = sft_tb["scalars"]
        assert {"train/loss", "train/lm_loss", "train/route_loss", "train/route_acc",
                "train/informative_frac", "train/lr", "train/grad_norm", "train/tokens_per_s",
                "train/step_time", "train/route_share_0", "train/route_share_2",
                "eval/loss"} <= set(scalars)
        assert [s for s, _ in scalars["train/loss"]] == [h["micro"] for h in sft]
        assert [v for _, v in scalars["train/loss"]] == pytest.approx([h["loss"] for h in sft])
        assert scalars["train/lr"][-1][1] < max(v for _, v in scalars["train/lr"])  # cosine
        assert all(v > 0 for _, v in scalars["train/grad_norm"])
        shares = [sum(v[i][1] for v in (scalars[f"train/route_share_{k}"] for k in range(3)))
                  for i in range(len(sft))]
        assert shares == pytest.approx([1.0] * len(sft), abs=1e-5)
        assert "train/route_share" in sft_tb["histograms"]
        samples = sft_tb["text"]["samples"]  # decoded samples: steps 30 and 60
        assert [s for s, _ in samples] == [30, 60] and all(t.strip() for _, t in samples)
        assert '"sft"' in sft_tb["text"]["config"][0][1]
        cdpo_tb = read_events(tmp_path / "run" / "tensorboard" / "cdpo")["scalars"]
        assert {"train/loss", "train/pref_acc", "train/reward_margin"} <= set(cdpo_tb)
        assert json.load(open(tmp_path / "run" / "config.json"))["train"]["sft"]["steps"] == 60

        experts = bundled_world()["experts"]
        res = decode_main([f"--config.router.path={exported}",
                           f"--config.experts.paths={tuple(experts)!r}",
                           "--prompt=twice rev abc", "--config.decode.max_new_tokens=5"])
        assert res.lengths[0] > 0
    finally:
        del os.environ["FR_JAX_HOME"]


@pytest.mark.slow  # 20-30 s, compile-bound: the fast tier keeps under 6 min
def test_precomputed_signals_give_the_online_loss_and_are_cached(tmp_path):
    from fr_jax.corpus import empty_rows, place_sequence
    from fr_jax.loop import precompute_signals
    from fr_jax.steps.objectives import SFT_FIELDS
    from fr_jax.steps.precompute import signals_program

    router, r_params, experts, e_params, sft, _ = _token_toy(n_per_domain=6)
    # lengths 9-16, so packed rows hold two or three examples and end at varied places
    sft = [SFTExample(e.ids[:10 + i % 7], e.response[:10 + i % 7]) for i, e in enumerate(sft)]
    cfg = base_config()
    mesh = sh.make_mesh({}, devices=jax.devices()[:1])
    stage = build_stage("sft", router, experts, mesh, cfg.train.sft, cfg.train, r_params,
                        {"experts": e_params}, vocab=97)
    frozen = jax.device_put({"experts": e_params}, stage.frozen_shardings)
    online = Batcher(sft, 4, 48, seed=1).next()
    cache = str(tmp_path / "signals.npz")
    pre = precompute_signals(sft, experts, e_params, 97, 48, batch_size=5, cache_file=cache,
                             progress=False)
    with_signals = Batcher(pre, 4, 48, seed=1).next()
    assert with_signals["signal_logprob"].shape == (4, 48, 2)
    _, evaluate = stage.jitted(online)
    _, evaluate_pre = stage.jitted(with_signals)
    a = jax.device_get(evaluate(r_params, frozen, stage.put_batch(online)))
    b = jax.device_get(evaluate_pre(r_params, frozen, stage.put_batch(with_signals)))
    for k in ("loss", "route_loss", "informative_frac", "route_acc"):
        np.testing.assert_allclose(a[k], b[k], rtol=1e-5, err_msg=k)
    # Packed rows give each example what it gets alone in a
    # row of its own: the reference path, one unpacked example per call.
    one = signals_program(experts, 97, 0, None, 48, 1)
    for e in pre:
        rows = empty_rows(1, 48)
        place_sequence(rows, 0, 0, e.ids, e.response, 1)
        lp, top1 = jax.device_get(one(e_params, {k: rows[k] for k in SFT_FIELDS}))
        n = len(e.ids) - 1
        np.testing.assert_allclose(e.signal_logprob, lp[:, 0, :n].T, atol=1e-5)
        np.testing.assert_array_equal(e.signal_top1, top1[:, 0, :n].T)
    # A second run reads the cache instead of running the experts (there are none) ...
    fresh = [SFTExample(e.ids, e.response) for e in sft]
    again = precompute_signals(fresh, None, e_params, 97, 48, batch_size=5, cache_file=cache,
                               progress=False)
    np.testing.assert_array_equal(again[3].signal_top1, pre[3].signal_top1)
    # ... but not with other experts' params: a cache shared between runs is keyed by them.
    other = jax.tree.map(lambda x: x * 1.5, e_params)
    moved = precompute_signals([SFTExample(e.ids, e.response) for e in sft], experts, other,
                               97, 48, batch_size=5, cache_file=cache, progress=False)
    assert not np.allclose(moved[3].signal_logprob, pre[3].signal_logprob)


@pytest.mark.slow
def test_precomputed_reference_gives_the_online_cdpo_loss_and_is_keyed_by_params(tmp_path,
                                                                                caplog):
    from fr_jax.corpus import PrefExample
    from fr_jax.loop import precompute_reference

    router, r_params, experts, e_params, _, pref = _token_toy(n_per_domain=6)
    # The policy moved away from the reference, so every term of the loss is non-trivial.
    noise = jax.random.normal(jax.random.key(3), (), np.float32)
    policy = jax.tree.map(lambda x: x * (1 + 0.05 * noise), r_params)
    cfg = base_config()
    cfg.train.cdpo.chosen_nll = 0.5
    mesh = sh.make_mesh({}, devices=jax.devices()[:1])
    frozen_online = {"experts": e_params, "ref": r_params}
    stage = build_stage("cdpo", router, experts, mesh, cfg.train.cdpo, cfg.train, r_params,
                        frozen_online, vocab=97)
    online = Batcher(pref, 4, 24, seed=1, kind="pref", pack=False).next()
    cache = str(tmp_path / "reference.npz")
    pre = precompute_reference(pref, router, r_params, experts, e_params, 97, 24,
                               batch_size=5, cache_file=cache, progress=False)
    with_ref = Batcher(pre, 4, 24, seed=1, kind="pref", pack=False).next()
    assert with_ref["chosen"]["ref_route_logits"].shape == (4, 24, 2)
    stage_pre = build_stage("cdpo", router, experts, mesh, cfg.train.cdpo, cfg.train,
                            r_params, {"experts": e_params}, vocab=97)
    _, evaluate = stage.jitted(online)
    _, evaluate_pre = stage_pre.jitted(with_ref)
    a = jax.device_get(evaluate(policy, jax.device_put(frozen_online, stage.frozen_shardings),
                                stage.put_batch(online)))
    b = jax.device_get(evaluate_pre(policy, jax.device_put({"experts": e_params},
                                                           stage_pre.frozen_shardings),
                                    stage_pre.put_batch(with_ref)))
    assert abs(a["reward_margin"]) > 1e-3 and a["route_kl"] > 0
    for k in ("loss", "dpo_loss", "route_kl", "chosen_nll", "reward_margin", "pref_acc"):
        np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6, err_msg=k)
    # Same data, same stage-1 router: the cache is read (no model is needed).
    fresh = lambda: [PrefExample(e.prompt, e.chosen, e.rejected) for e in pref]
    again = precompute_reference(fresh(), None, r_params, None, None, 97, 24, batch_size=5,
                                 cache_file=cache, progress=False)
    np.testing.assert_array_equal(again[3].ref_route[1], pre[3].ref_route[1])
    np.testing.assert_array_equal(again[3].ref_logprob, pre[3].ref_logprob)
    # Another stage-1 router: recomputed, with a warning.
    with caplog.at_level("WARNING"):
        other = precompute_reference(fresh(), router, policy, experts, e_params, 97, 24,
                                     batch_size=5, cache_file=cache, progress=False)
    assert "does not match" in caplog.text
    assert not np.allclose(other[3].ref_logprob, pre[3].ref_logprob)


@pytest.mark.parametrize("name", ["llama3", "gemma2"])
def test_real_family_configs_parse_and_name_missing_checkpoints(name, tmp_path):
    from fr_jax.train import main as train_main
    # The checkpoints, then the data file, are checked before the workdir is touched.
    with pytest.raises(SystemExit, match="(checkpoint|tokenizer) folder '/ckpt/.*' does not exist"):
        train_main([f"--config={os.path.join(REPO, 'configs', name + '.py')}",
                    "--config.train.sft.lr=2e-5", f"--config.train.workdir={tmp_path}/run"])
    bundled = bundled_world()
    with pytest.raises(SystemExit, match="data.sft_path='/data/.*' does not exist"):
        train_main([f"--config={os.path.join(REPO, 'configs', name + '.py')}",
                    f"--config.router.path={bundled['router_base']}",
                    f"--config.experts.paths={','.join(bundled['experts'])}",
                    f"--config.train.workdir={tmp_path}/run"])
    assert not os.path.exists(f"{tmp_path}/run")
    with pytest.raises(SystemExit, match="unknown config field.*train.sft.bogus"):
        train_main([f"--config={os.path.join(REPO, 'configs', name + '.py')}",
                    "--config.train.sft.bogus=1"])
