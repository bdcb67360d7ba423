"""The baselines: model merging (against NumPy references, through HF folders and the CLI),
layer probes and SharedTrunkNet (against SciPy / hand-computed values, on synthetic
activations), and decode mode `sequence` against each row's chosen target decoded alone."""

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from fr_jax.baselines import merging as M
from fr_jax.baselines import probes as P
from fr_jax.routing import trunk as T
from fr_jax.routing.selector import Selector
from fr_jax.runtime.errors import CheckpointError


# ---------------------------------------------------------------------------- merging
def _tree(rng, scale=1.0):
    return {"a": rng.normal(size=(4, 5)).astype(np.float32) * scale,
            "b": {"c": rng.normal(size=(7,)).astype(np.float32) * scale,
                  "d": rng.normal(size=(2, 3, 2)).astype(np.float32) * scale}}


def _leaves(t):
    return [np.asarray(x) for x in jax.tree.leaves(t)]


@pytest.fixture
def family():
    rng = np.random.default_rng(0)
    base = _tree(rng)
    experts = [jax.tree.map(lambda b, d: b + d, base, _tree(rng, 0.1)) for _ in range(3)]
    return base, experts


def _np_ties(base, experts, density, lam):
    out = []
    for b, *es in zip(_leaves(base), *map(_leaves, experts)):
        trimmed = []
        for e in es:
            tau = (e.astype(np.float32) - b).reshape(-1)
            k = max(1, math.ceil(density * tau.size))
            keep = np.argsort(-np.abs(tau), kind="stable")[:k]
            t = np.zeros_like(tau)
            t[keep] = tau[keep]
            trimmed.append(t)
        trimmed = np.stack(trimmed)
        sign = np.sign(trimmed.sum(0))
        agree = (np.sign(trimmed) == sign) & (trimmed != 0)
        count = agree.sum(0)
        mean = np.where(count > 0, np.where(agree, trimmed, 0).sum(0) / np.maximum(count, 1), 0)
        out.append(b + lam * mean.reshape(b.shape))
    return out


def test_merge_methods_match_numpy_references(family):
    base, experts = family
    got = M.linear(experts, [1.0, 2.0, 3.0])
    want = [(1 * e0 + 2 * e1 + 3 * e2) / 6 for e0, e1, e2 in zip(*map(_leaves, experts))]
    for g, w in zip(_leaves(got), want):
        np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-6)
    got = M.task_arithmetic(base, experts, [0.5, 0.3, 0.2])
    want = [b + 0.5 * (e0 - b) + 0.3 * (e1 - b) + 0.2 * (e2 - b)
            for b, e0, e1, e2 in zip(_leaves(base), *map(_leaves, experts))]
    for g, w in zip(_leaves(got), want):
        np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-6)
    for density, lam in ((0.4, 0.8), (0.05, 1.0), (1.0, 1.0)):
        got = M.ties(base, experts, density, lam)
        for g, w in zip(_leaves(got), _np_ties(base, experts, density, lam)):
            np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-6)
    # The result keeps the base's dtype.
    bf = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), base)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(
        M.task_arithmetic(bf, [jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), e)
                               for e in experts])))


def test_dare_drops_and_rescales_reproducibly_by_seed():
    rng = np.random.default_rng(1)
    base = {"w": np.zeros((200, 100), np.float32), "v": np.zeros((50,), np.float32)}
    expert = {"w": rng.normal(size=(200, 100)).astype(np.float32),
              "v": rng.normal(size=(50,)).astype(np.float32)}
    a = M.dare(base, [expert], drop=0.7, seed=3)
    b = M.dare(base, [expert], drop=0.7, seed=3)
    c = M.dare(base, [expert], drop=0.7, seed=4)
    for x, y in zip(_leaves(a), _leaves(b)):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(np.asarray(a["w"]), np.asarray(c["w"]))
    w = np.asarray(a["w"])
    kept = w != 0
    assert abs(kept.mean() - 0.3) < 0.02  # keep probability 1 - drop
    np.testing.assert_allclose(w[kept], expert["w"][kept] / 0.3, rtol=1e-6)
    # Two experts get different masks from one seed; DARE + TIES runs.
    two = M.dare(base, [expert, expert], drop=0.5, seed=0, lambdas=[1.0, 0.0])
    one = M.dare(base, [expert], drop=0.5, seed=0)
    np.testing.assert_array_equal(np.asarray(two["w"]), np.asarray(one["w"]))
    M.dare(base, [expert, expert], drop=0.5, combine="ties", density=0.5)


def test_identical_experts_give_base_plus_task_exactly(family):
    base, experts = family
    same = [experts[0]] * 3
    tau = jax.tree.map(lambda e, b: jnp.float32(e) - jnp.float32(b), experts[0], base)
    base_plus_task = jax.tree.map(lambda b, t: jnp.float32(b) + t, base, tau)
    for merged in (M.ties(base, same, density=1.0, lam=1.0),
                   M.task_arithmetic(base, [experts[0]], 1.0),
                   M.dare(base, same, drop=0.0, combine="ties", density=1.0)):
        for g, w in zip(_leaves(merged), _leaves(base_plus_task)):
            np.testing.assert_array_equal(g, w)
    for g, w in zip(_leaves(M.linear(same)), _leaves(experts[0])):
        np.testing.assert_allclose(g, w, rtol=1e-6)


def test_merge_errors_name_the_problem(family):
    base, experts = family
    bad = dict(experts[0], a=np.zeros((4, 6), np.float32))
    with pytest.raises(M.MergeError, match=r"tensor 'a': expert 1 has shape \(4, 6\).*same base"):
        M.ties(base, [experts[0], bad])
    missing = {"a": experts[0]["a"], "b": {"c": experts[0]["b"]["c"]}}
    with pytest.raises(M.MergeError, match="tensor 'b/d' is missing from expert 0"):
        M.task_arithmetic(base, [missing])
    with pytest.raises(M.MergeError, match=r"density must be in \(0, 1\]"):
        M.ties(base, experts, density=0.0)
    with pytest.raises(M.MergeError, match=r"drop must be in \[0, 1\)"):
        M.dare(base, experts, drop=1.0)
    with pytest.raises(M.MergeError, match="unknown merge method 'avg'"):
        M.merge("avg", base, experts)
    with pytest.raises(M.MergeError, match="one value per expert"):
        M.task_arithmetic(base, experts, [1.0, 2.0])


def _tiny_family(tmp_path):
    """A tiny Llama base and three perturbed 'experts', as HF folders with the toy tokenizer."""
    import ml_collections

    from fr_jax.hf import save_hf
    from fr_jax.models import Model
    from fr_jax.harness import toy_world as W
    from fr_jax.toy.pipeline import model_config

    tok = W.build_tokenizer()
    m = ml_collections.ConfigDict(dict(hidden_size=32, num_layers=2, intermediate_size=64,
                                       num_heads=4, num_kv_heads=2))
    cfg = model_config(m, tok)
    base = jax.device_get(Model(cfg).init(jax.random.key(0)))
    paths = {"base": str(tmp_path / "base")}
    save_hf(paths["base"], cfg, base, tokenizer=tok)
    rng = np.random.default_rng(0)
    experts = []
    for i in range(3):
        e = jax.tree.map(lambda x: x + rng.normal(size=x.shape).astype(np.float32) * 0.05, base)
        paths[f"e{i}"] = str(tmp_path / f"e{i}")
        save_hf(paths[f"e{i}"], cfg, e, tokenizer=tok)
        experts.append(e)
    return cfg, base, experts, paths


@pytest.mark.slow  # 15 s: the fast tier keeps under 6 min
def test_merged_hf_folder_loads_in_transformers_and_fr_jax_with_equal_logits(tmp_path, capsys):
    import torch
    from transformers import AutoModelForCausalLM

    from fr_jax.hf import load_hf
    from fr_jax.merge import main as merge_main
    from fr_jax.models import Model

    cfg, base, experts, paths = _tiny_family(tmp_path)
    out = str(tmp_path / "merged")
    merge_main([f"--base={paths['base']}", f"--experts={paths['e0']},{paths['e1']},{paths['e2']}",
                "--method=ties", "--config.density=0.3", f"--out={out}"])
    assert "merged 3 experts" in capsys.readouterr().out
    assert json.load(open(os.path.join(out, "merge.json")))["method"] == "ties"
    got_cfg, got = load_hf(out)
    want = M.ties(base, experts, density=0.3, lam=1.0)
    for g, w in zip(_leaves(got), _leaves(want)):
        np.testing.assert_array_equal(g, w)
    tokens = np.array([[1, 5, 9, 20, 33, 40, 7, 3]])
    ours = np.asarray(Model(got_cfg).forward(got, jnp.asarray(tokens)).logits)
    hf = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager",
                                              torch_dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = hf(torch.as_tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-4)
    with pytest.raises(SystemExit, match="error: checkpoint folder '/no/such/base' does not exist"):
        merge_main(["--base=/no/such/base", f"--experts={paths['e0']}", f"--out={out}"])


# ---------------------------------------------------------------------------- probes
def _scatters(x, y, reg):
    y = y.astype(bool)
    mu = x.mean(0)
    s_b = np.zeros((x.shape[1],) * 2)
    s_w = np.zeros_like(s_b)
    for c in (False, True):
        xc = x[y == c]
        pi = len(xc) / len(x)
        d = xc.mean(0) - mu
        s_b += pi * np.outer(d, d)
        s_w += pi * np.cov(xc.T, bias=True)
    return s_b, s_w + reg * np.trace(s_w) / x.shape[1] * np.eye(x.shape[1])


def test_fisher_J_matches_scipy_and_grows_with_the_mean_gap():
    rng = np.random.default_rng(0)
    y = rng.random(600) < 0.4
    noise = rng.normal(size=(600, 6)) @ rng.normal(size=(6, 6))
    js = []
    for gap in (0.25, 0.5, 1.0, 2.0):
        x = noise.copy()
        x[y, 0] += gap * 3
        s_b, s_w = _scatters(x, y, 1e-2)
        ref = scipy.linalg.eigh(s_b, s_w, eigvals_only=True).max()  # rank one: tr = top
        j = P.fisher_separability(x, y, 1e-2)
        np.testing.assert_allclose(j, ref, rtol=1e-8)
        np.testing.assert_allclose(j, np.trace(np.linalg.solve(s_w, s_b)), rtol=1e-8)
        js.append(j)
    assert all(a < b for a, b in zip(js, js[1:]))
    assert math.isnan(P.fisher_separability(x, np.zeros(600, bool)))


@pytest.mark.parametrize("n,d,k", [(4000, 20, 4), (60, 300, 3)])
def test_effective_dimension_of_an_isotropic_cloud_is_its_rank(n, d, k):
    rng = np.random.default_rng(1)
    basis = np.linalg.qr(rng.normal(size=(d, k)))[0]
    x = rng.normal(size=(n, k)) @ basis.T * 3.0 + 7.0
    lam = np.linalg.eigvalsh(np.cov(x.T, bias=True))
    np.testing.assert_allclose(P.effective_dim(x), lam.sum() ** 2 / (lam ** 2).sum(), rtol=1e-6)
    assert abs(P.effective_dim(x) - k) < 0.15 * k


def _synthetic(rng, n=800, layers=4, d=12, informative=2, targets=3):
    """Prompts of `targets` latent kinds; target t is right on kind t (and on 10% of the
    others); only layer `informative` encodes the kind."""
    kind = rng.integers(0, targets, n)
    correct = (kind[:, None] == np.arange(targets)[None]) | (rng.random((n, targets)) < 0.1)
    feats = rng.normal(size=(layers, n, d))
    feats[informative, :, :targets] += 2.0 * np.eye(targets)[kind]
    return feats.astype(np.float32), correct


def test_probe_picks_the_informative_layer_and_the_trunk_routes_well(tmp_path):
    rng = np.random.default_rng(2)
    feats, correct = _synthetic(rng)
    names = ["a", "b", "c"]
    table = P.probe_layers(feats[:, :600], correct[:600], names)
    assert table.chosen == 2 and table.J_mean[2] > 3 * np.delete(table.J_mean, 2).max()
    paths = P.write_probe_report(table, str(tmp_path))
    assert open(paths["png"], "rb").read(4) == b"\x89PNG"
    assert P.ProbeTable.from_dict(json.load(open(paths["json"]))).chosen == 2
    assert "**(chosen)**" in open(paths["md"]).read()

    cfg = T.TrunkConfig(hidden=(32, 32), steps=300, lr=3e-3, batch_size=64, seed=0)
    trunk, history = T.train_trunk(feats[2, :600], correct[:600], names, 2, [1, 1, 1], cfg)
    assert history["train_loss"][-1] < history["train_loss"][0]
    m = T.metrics(correct[600:], T.route(trunk.predict(feats[2, 600:]), [1, 1, 1], 0.0),
                  [1, 1, 1], names)
    # Chance (any one target) is about 40%; the oracle near 100%.
    assert m["accuracy"] >= m["best_single_accuracy"] + 0.7 * (m["oracle"] - m["best_single_accuracy"])
    again, _ = T.train_trunk(feats[2, :600], correct[:600], names, 2, [1, 1, 1], cfg)
    np.testing.assert_array_equal(trunk.predict(feats[2, 600:]), again.predict(feats[2, 600:]))
    T.save_trunk(str(tmp_path / "trunk"), trunk)
    loaded = T.load_trunk(str(tmp_path / "trunk"))
    np.testing.assert_array_equal(loaded.predict(feats[2, 600:]), trunk.predict(feats[2, 600:]))
    assert (loaded.layer, loaded.target_names, loaded.hidden) == (2, names, (32, 32))
    with pytest.raises(CheckpointError, match="not a SharedTrunkNet folder.*fr_jax.seqroute"):
        T.load_trunk(str(tmp_path / "nothing"))


def test_metrics_and_routing_rule_on_a_hand_made_table():
    correct = np.array([[1, 0, 1], [0, 1, 1], [0, 0, 1], [0, 0, 0]], bool)
    costs = [1.0, 2.0, 4.0]
    chosen = np.array([0, 1, 1, 2])
    m = T.metrics(correct, chosen, costs, ["x", "y", "z"])
    # routed: right, right, wrong, wrong = 0.5; best single z = 0.75; oracle 0.75.
    assert (m["accuracy"], m["best_single"], m["best_single_accuracy"], m["oracle"]) == \
        (0.5, "z", 0.75, 0.75)
    assert math.isnan(m["gap_captured"])  # the oracle is no better than z
    assert m["mean_cost"] == (1 + 2 + 2 + 4) / 4 and m["cost_saving"] == 1 - 2.25 / 4
    correct2 = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 0, 0]], bool)
    m2 = T.metrics(correct2, np.array([0, 1, 0, 0]), costs, ["x", "y", "z"])
    # best single x = 0.5, oracle 1.0, routed 0.75 -> half the gap.
    assert m2["gap_captured"] == 0.5 and m2["routed_share"]["x"] == 0.75
    p = np.array([[0.9, 0.8, 0.95], [0.5, 0.5, 0.5]])
    np.testing.assert_array_equal(T.route(p, costs, 0.0), [2, 0])  # tie -> cheapest
    np.testing.assert_array_equal(T.route(p, costs, 10.0), [0, 0])
    np.testing.assert_array_equal(T.route(p, costs, 0.1), [0, 0])  # 0.95-0.1 < 0.9-0.025
    rows = T.sweep(p, np.ones((2, 3), bool), costs, ["x", "y", "z"], [0.0, 1.0])
    assert [r["lam"] for r in rows] == [0.0, 1.0]


# ---------------------------------------------------------------------------- decode mode
@pytest.mark.slow
def test_sequence_mode_decodes_each_row_with_its_chosen_target():
    """The jitted `sequence` mode against its reference: the SharedTrunkNet's choice computed
    offline (encode_features -> predict -> route), then that target decoded alone."""
    from fixtures import PROMPTS, build_world

    from fr_jax.baselines import seqroute_pipeline as S
    from fr_jax.inference import FusedDecoder
    from fr_jax.routing.modes import Mode

    router, r_params, experts, e_list = build_world("llama")
    params = {"router": r_params, "experts": experts.combine(e_list)}
    targets, costs = ["expert:0", "expert:2", "fusionroute"], [1.0, 1.0, 3.0]
    feats = S.encode_features(router.backbone, r_params["backbone"], PROMPTS, 0, batch_size=4)
    assert feats.shape == (2, len(PROMPTS), 2 * router.cfg.hidden_size)
    alone = S.encode_features(router.backbone, r_params["backbone"], PROMPTS[1:2], 0, 2)
    np.testing.assert_allclose(alone[:, 0], feats[:, 1], rtol=1e-5, atol=1e-4)  # padding-free
    for seed in range(40):  # a random net that sends the rows to different targets
        net = T.SharedTrunkNet((16,), 3)
        trunk = T.Trunk(net.init(jax.random.key(seed), jnp.zeros((1, feats.shape[-1])))["params"],
                        feats[1].mean(0), feats[1].std(0) + 1e-3, targets, 1, costs, (16,))
        choice = T.route(trunk.predict(feats[1]), costs, 0.0)
        if len(set(choice.tolist())) >= 2:
            break
    assert len(set(choice.tolist())) >= 2
    sel = Selector(router.cfg, trunk, lam=0.0)
    params["selector"] = sel.params(r_params["backbone"])
    res = FusedDecoder(Mode.parse("sequence"), router, experts, chunk=3, selector=sel).generate(
        params, PROMPTS, 7, eos_ids=[])
    for row, prompt in enumerate(PROMPTS):
        ref = FusedDecoder(Mode.parse(targets[choice[row]], 3), router, experts, chunk=3)
        one = ref.generate(params, [prompt], 7, eos_ids=[])
        assert res.row(row) == one.row(0), (row, targets[choice[row]])
    with pytest.raises(Exception, match="needs a trained SharedTrunkNet"):
        FusedDecoder(Mode.parse("sequence"), router, experts)


def test_lazy_catch_up_passes_and_the_cost_of_each_schedule():
    """An expert reads its weights once per token it gives, plus one pass per catch-up chunk
    of `width` over the tokens it missed; the routed target's cost counts the router and
    those passes (lazy) or the router and every expert (eager)."""
    from types import SimpleNamespace

    from fr_jax.baselines.seqroute_pipeline import default_costs, lazy_passes

    # t:      0  1  2  3  4  5  6  7  8  9 10 11
    route = [0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0]
    # expert 1 missed 2 tokens at t=2 (one chunk of 4); expert 0 missed 9 at t=11 (3 chunks)
    assert lazy_passes(route, 4) == [1, 1, 2, 1, 1, 1, 1, 1, 1, 1, 1, 4]
    assert lazy_passes([2, 2, 2], 8) == [1, 1, 1]
    params = {"router": {"w": np.zeros(10)},
              "experts": [{"w": np.zeros(100)}, {"w": np.zeros(200)}]}
    lineup = SimpleNamespace(params=params, router=object(),
                             experts=SimpleNamespace(stacked=False, n=2))
    targets = ["expert:0", "expert:1", "fusionroute"]
    assert default_costs(lineup, targets) == [100.0, 200.0, 310.0]
    reads = sum((100, 200)[e] * k for e, k in zip(route, lazy_passes(route, 4)))
    lazy = default_costs(lineup, targets, {"fusionroute": [route, None]}, lazy=True, width=4)
    assert lazy == [100.0, 200.0, 10 + reads / len(route)]
    # no routing recorded (an older label cache): the selected expert once per token
    assert default_costs(lineup, targets, {}, lazy=True)[2] == 10 + 150.0
