"""Self-speculative decoding (decode.speculate): the router drafts, the experts verify a
chunk. Checked against plain decoding (speculate = 0): the same greedy tokens and chosen
experts in every mode it serves, eager and lazy, k = 1, 2, 4, 8, batches of 1 and 8, rows
ending early, caches sized to the last slot; sampling keeps the fused distribution (a
chi-square test against the rule computed from whole-sequence forwards)."""

import json

import numpy as np
import pytest
from scipy import stats

import jax
import jax.numpy as jnp

from fr_jax.inference import FusedDecoder, SpeculativeDecoder
from fr_jax.inference.sampling import Sampling, filter_logits
from fr_jax.inference.speculative import acceptance
from fr_jax.models.cache import init_cache, rewind
from fr_jax.routing.experts import Experts
from fr_jax.routing.modes import Mode
from fr_jax.routing.router import Router
from fr_jax.runtime.errors import CacheOverflowError, ModeError
from fixtures import N_EXPERTS, PROMPTS, _scale, build_world, mixed_selector, tiny

N_NEW = 13
# Eight ragged rows: batch 8, each row with its own acceptance lengths.
PROMPTS_8 = PROMPTS + [[3], [70, 71], [12, 13, 14, 15], [88, 2, 9], [41, 42, 43, 44, 45, 46]]


def _decode(cls, mode, router, experts, params, prompts, lazy, k=0, eos_ids=(), n_new=N_NEW,
            cache_len=None, sampling=Sampling(), seed=0, **kw):
    extra = dict(speculate=k) if k else {}
    dec = cls(Mode.parse(mode, experts.n), router, experts, chunk=3, lazy_experts=lazy,
              catch_up_width=2, sampling=sampling, **extra, **kw)
    return dec.generate(params, prompts, n_new, eos_ids=list(eos_ids), cache_len=cache_len,
                        seed=seed)


def _rows(res, n):
    return [res.row(b) for b in range(n)]


def _assert_exact(mode, router, experts, params, prompts, cases, eos_ids=(), **kw):
    """Greedy speculative == plain decoding: tokens, chosen experts, routing weights. cases:
    (lazy experts?, k) pairs, each checked against one plain (lazy) decode: lazy and eager
    plain decoding agree (tests/test_lazy.py), so one reference serves both."""
    plain = _decode(FusedDecoder, mode, router, experts, params, prompts, True,
                    eos_ids=eos_ids, **kw)
    for lazy, k in cases:
        # the cache sized to the last slot a drafted chunk can reach
        need = max(len(p) for p in prompts) + N_NEW + k
        spec = _decode(SpeculativeDecoder, mode, router, experts, params, prompts, lazy,
                       k, eos_ids=eos_ids, cache_len=need, **kw)
        assert _rows(spec, len(prompts)) == _rows(plain, len(prompts)), (mode, lazy, k)
        np.testing.assert_array_equal(spec.lengths, plain.lengths)
        for b, n in enumerate(plain.lengths):  # (plain decoding fills past an end id)
            np.testing.assert_allclose(spec.route_probs[b, :n], plain.route_probs[b, :n],
                                       rtol=1e-4, atol=1e-5)
        # every pass yields its kept drafts and one token of the rule
        assert int(np.sum(spec.spec_passes + spec.spec_accepted)) == int(
            np.sum(spec.lengths - 1)), (mode, lazy, k)
        assert np.all(spec.spec_accepted <= k * spec.spec_passes)
    return plain


def test_greedy_tokens_equal_plain_decoding_fast():
    """The fast tier's check: FusionRoute, lazy experts, k = 1 and 4, three ragged rows."""
    router, r_params, experts, e_list = build_world("llama")
    params = {"router": r_params, "experts": experts.combine(e_list)}
    _assert_exact("fusionroute", router, experts, params, PROMPTS, [(True, 1), (True, 4)])


@pytest.mark.slow
@pytest.mark.parametrize("model_type", ["llama", "gemma2"])
def test_greedy_tokens_equal_plain_decoding(model_type):
    """FusionRoute at k = 2, 8 (lazy) and 4 (eager), expert_only at k = 2 (eager), three
    ragged rows; Gemma-2's sliding window (4) and soft-caps are crossed by chunks of up to 9
    tokens."""
    router, r_params, experts, e_list = build_world(model_type)
    params = {"router": r_params, "experts": experts.combine(e_list)}
    _assert_exact("fusionroute", router, experts, params, PROMPTS,
                  [(True, 2), (True, 8), (False, 4)])
    _assert_exact("expert_only", router, experts, params, PROMPTS, [(False, 2)])


@pytest.mark.slow
def test_batch_of_eight_rows_ending_early():
    """Batch 8 and batch 1, a row ending at an end id a few tokens in (its later drafts are
    dropped), others running to the budget."""
    router, r_params, experts, e_list = build_world("llama", seed=3)
    params = {"router": r_params, "experts": experts.combine(e_list)}
    free = _decode(FusedDecoder, "fusionroute", router, experts, params, PROMPTS_8, True)
    rows = [free.row(b)[0] for b in range(len(PROMPTS_8))]
    # an id that first appears a few tokens into one row and nowhere in another
    row, end = next((b, i) for b, t in enumerate(rows) for i in range(2, N_NEW - 2)
                    if t[i] not in t[:i] and any(t[i] not in o for o in rows))
    plain = _assert_exact("fusionroute", router, experts, params, PROMPTS_8,
                          [(True, 1), (True, 4), (False, 8)], eos_ids=[rows[row][end]])
    assert plain.lengths[row] == end + 1 and plain.lengths.max() == N_NEW
    _assert_exact("fusionroute", router, experts, params, PROMPTS_8[:1], [(True, 2)])


@pytest.mark.slow
def test_forced_routing_several_experts_in_one_chunk():
    """Alternating experts every token: every chunk needs two or three experts, each reading
    the whole chunk (lazy: after catching up on what it missed, also after a long absence)."""
    router, r_params, experts, e_list = build_world("llama", seed=1)
    params = {"router": r_params, "experts": experts.combine(e_list)}
    for schedule, cases in [((0, 2), [(True, 4)]), ((0, 1, 2), [(True, 2), (False, 4)]),
                            ((0,) * 7 + (2, 1), [(True, 4)])]:
        _assert_exact("fusionroute", router, experts, params, PROMPTS, cases,
                      route_schedule=schedule)


@pytest.mark.slow
def test_sequence_modes_listed_experts_and_an_untied_router():
    """sequence:head (the router drafts, the prompt's expert verifies), sequence (a
    SharedTrunkNet sends rows to an expert alone or to FusionRoute); experts of different
    shapes (a list) and a router with its own LM head (random lineups of other layouts)."""
    router, r_params, experts, e_list = build_world("llama", seed=2)
    params = {"router": r_params, "experts": experts.combine(e_list)}
    _assert_exact("sequence:head", router, experts, params, PROMPTS, [(True, 4), (False, 1)])

    sel = mixed_selector(router, r_params)
    params["selector"] = sel.params(r_params["backbone"])
    _assert_exact("sequence", router, experts, params, PROMPTS, [(True, 2), (False, 4)],
                  selector=sel)

    cfg = tiny("llama")
    shapes = [cfg, cfg.replace(intermediate_size=64), cfg.replace(num_layers=2,
                                                                   layer_types=cfg.layer_types[:2])]
    listed = Experts(shapes, stacked=False)
    e_params = listed.combine([_scale(m.init(jax.random.key(10 + i)))
                               for i, m in enumerate(listed.models)])
    untied = Router(cfg.replace(num_layers=2, layer_types=cfg.layer_types[:2],
                                tie_word_embeddings=False), N_EXPERTS)
    u_params = untied.init(jax.random.key(5))
    u_params = {"backbone": _scale(u_params["backbone"]),
                "head": {"kernel": u_params["head"]["kernel"] * 400.0}}
    _assert_exact("fusionroute", untied, listed, {"router": u_params, "experts": e_params},
                  PROMPTS, [(True, 4), (False, 1)])


@pytest.mark.slow
def test_bundled_world_same_answers_and_acceptance_per_domain(tmp_path):
    """The bundled world's lineup on held-out toy prompts: speculative answers equal plain
    ones through the evaluation harness, which reports tokens per expert pass per domain."""
    from fr_jax.harness import runner as harness
    from fr_jax.harness import toy_world as W
    from fr_jax.harness.benchmarks import toy_examples
    from fr_jax.runtime.bundle import bundled_world
    from fr_jax.toy.world_pairs import load_world_lineup

    world = bundled_world()
    lineup = load_world_lineup(world["router"], world["experts"])
    lineup.lazy_experts = True
    tests = W.make_world_data(40, 8, seed=0).test
    examples = {"toy": toy_examples([t for d in W.EVAL_DOMAINS for t in tests[d]])}
    out = {}
    for k in (0, 4):
        lineup.speculate = k
        s = harness.Settings(max_new_tokens={"toy": 24}, workdir=str(tmp_path / f"k{k}"),
                             batch_size=16, progress=False, columns="groups")
        out[k] = harness.evaluate(lineup, examples, ["fusionroute", "expert_only"], s)
    for mode in ("fusionroute", "expert_only"):
        for b in out[0]["examples"][mode]:
            assert out[4]["examples"][mode][b] == out[0]["examples"][mode][b], mode
        assert out[4]["accuracy"][mode] == out[0]["accuracy"][mode]
        spec = out[4]["speculation"][mode]
        assert set(spec) == set(W.EVAL_DOMAINS)
        for v in spec.values():
            assert v["k"] == 4 and v["passes"] > 0 and 1.0 <= v["tokens_per_pass"] <= 5.0
    assert "speculation" not in out[0]
    # FusionRoute's router is trained with the expert: on average more than one token a pass
    assert np.mean([v["tokens_per_pass"] for v in out[4]["speculation"]["fusionroute"].values()]) > 1.2
    gens = harness.JsonlCache(str(tmp_path / "k4" / "generations" / "toy" / "fusionroute.jsonl"))
    assert gens.records and all(len(r["speculation"]) == 2 for r in gens.records.values())


# ------------------------------------------------------------------------------ sampling
V_SMALL = 6


def _small_world(seed):
    """A lineup over a 6-token vocabulary, so the joint law of three tokens has 216 cells."""
    cfg = tiny("llama").replace(vocab_size=V_SMALL)
    router = Router(cfg.replace(num_layers=2, layer_types=cfg.layer_types[:2]), 2)
    keys = jax.random.split(jax.random.key(seed), 3)
    r_params = router.init(keys[0])
    r_params = {"backbone": _scale(r_params["backbone"], 2.0),
                "head": {"kernel": r_params["head"]["kernel"] * 400.0}}
    experts = Experts([cfg] * 2)
    e_list = [_scale(experts.models[0].init(k), 2.0) for k in keys[1:]]
    return router, r_params, experts, e_list


def _fused_dists(router, r_params, experts, e_list, seqs, sampling):
    """The distribution plain sampling draws the next token from after each of seqs [N, T]
    (FusionRoute, from whole-sequence forwards): softmax(filter(fused log-probs / T))."""
    seqs = jnp.asarray(seqs)
    r = router.forward(r_params, seqs)
    e = jnp.stack([experts.models[0].forward(p, seqs).logits[:, -1] for p in e_list])
    k = jnp.argmax(r.route_logits[:, -1], axis=-1)
    sel = jnp.take_along_axis(e, k[None, :, None], axis=0)[0]
    lsm = jax.nn.log_softmax
    fused = lsm(lsm(r.logits[:, -1]) + lsm(sel))
    out = filter_logits(fused / sampling.temperature, sampling.top_k, sampling.top_p)
    return np.asarray(jax.nn.softmax(out, axis=-1), np.float64)


@pytest.mark.slow
@pytest.mark.parametrize("sampling", [Sampling(temperature=1.0),
                                      Sampling(temperature=0.8, top_k=4, top_p=0.95)],
                         ids=["t1", "t0.8-topk4-topp0.95"])
def test_sampling_keeps_the_fused_distribution(sampling):
    """8,192 rows of one prompt (each row its own draws), k = 2: the first three tokens --
    the prefill's, then one speculative step's kept drafts, its fused or residual draw,
    and the next step's -- against their exact joint law, chi-square at the 0.1% level."""
    router, r_params, experts, e_list = _small_world(seed=4)
    params = {"router": r_params, "experts": experts.combine(e_list)}
    prompt = [1, 4, 2, 5]
    dec = SpeculativeDecoder(Mode.parse("fusionroute", 2), router, experts, 2, chunk=1,
                             sampling=sampling, lazy_experts=True, catch_up_width=2)
    rows, draws, kept, passes = 2048, [], 0, 0
    for seed in range(4):
        res = dec.generate(params, [prompt] * rows, 3, eos_ids=[], seed=seed)
        draws.append(res.tokens[:, :3])
        kept, passes = kept + res.spec_accepted.sum(), passes + res.spec_passes.sum()
    draws = np.concatenate(draws)
    # the drafts are neither always kept nor always refused: every path of the rule ran
    assert 0.1 < kept / (2 * passes) < 0.9, kept / (2 * passes)

    v = V_SMALL
    p0 = _fused_dists(router, r_params, experts, e_list, [prompt], sampling)[0]
    one = [prompt + [a] for a in range(v)]
    p1 = _fused_dists(router, r_params, experts, e_list, one, sampling)
    two = [prompt + [a, b] for a in range(v) for b in range(v)]
    p2 = _fused_dists(router, r_params, experts, e_list, two, sampling).reshape(v, v, v)
    law = p0[:, None, None] * p1[:, :, None] * p2
    counts = np.zeros((v, v, v))
    np.add.at(counts, tuple(draws.T), 1)
    expected = law.ravel() * len(draws)
    assert counts.ravel()[expected == 0].sum() == 0  # nothing outside the filtered support
    big = expected >= 5  # the usual pooling: cells expected below 5 go into one
    obs = np.append(counts.ravel()[big], counts.ravel()[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    obs, exp = (obs, exp) if exp[-1] > 0 else (obs[:-1], exp[:-1])
    chi2, p = stats.chisquare(obs, exp * obs.sum() / exp.sum())  # float sums, made equal
    assert p > 1e-3, (chi2, p, len(obs))


@pytest.mark.slow
def test_top_k_one_sampling_is_greedy_and_seeds_reproduce():
    """Where the rule leaves no randomness (top_k = 1: p and q one-hot) sampled speculative
    tokens equal greedy plain decoding; a seed reproduces its draws."""
    router, r_params, experts, e_list = build_world("llama")
    params = {"router": r_params, "experts": experts.combine(e_list)}
    plain = _decode(FusedDecoder, "fusionroute", router, experts, params, PROMPTS, True)
    one = Sampling(temperature=0.7, top_k=1)
    spec = _decode(SpeculativeDecoder, "fusionroute", router, experts, params, PROMPTS, True,
                   4, sampling=one, seed=5)
    assert _rows(spec, 3) == _rows(plain, 3)
    hot = SpeculativeDecoder(Mode.parse("fusionroute", experts.n), router, experts, 4,
                             chunk=3, lazy_experts=True, catch_up_width=2,
                             sampling=Sampling(temperature=1.0))
    a, b, c = (hot.generate(params, PROMPTS, N_NEW, eos_ids=[], seed=s) for s in (1, 1, 2))
    assert _rows(a, 3) == _rows(b, 3) and _rows(a, 3) != _rows(c, 3)


# ------------------------------------------------------------------------------ pieces
def test_rewind_forgets_the_last_slots_of_each_row():
    cfg = tiny("llama")
    c = init_cache(cfg, 2, 8)
    c = c.replace(pos=jnp.asarray([[0, 1, 2, 3, 4, -1, -1, -1], [-1, 0, 1, 2, -1, -1, -1, -1]]),
                  end=jnp.asarray([5, 4]), next_pos=jnp.asarray([5, 3]))
    r = rewind(c, jnp.asarray([2, 0]))
    np.testing.assert_array_equal(r.end, [3, 4])
    np.testing.assert_array_equal(r.next_pos, [3, 3])
    np.testing.assert_array_equal(r.pos, [[0, 1, 2, -1, -1, -1, -1, -1],
                                          [-1, 0, 1, 2, -1, -1, -1, -1]])
    stacked = jax.tree.map(lambda x: jnp.stack([x, x]), c)  # experts' leading axis
    np.testing.assert_array_equal(rewind(stacked, jnp.asarray([2, 0])).end, [[3, 4], [3, 4]])


def test_acceptance_summary():
    s = acceptance(np.array([4, 2]), np.array([6, 0]), 4)
    assert s == {"k": 4, "passes": 6, "tokens_per_pass": 2.0, "acceptance": 0.25}


def test_refusals_and_the_lineup_fallback(tmp_path):
    router, r_params, experts, e_list = build_world("llama")
    params = {"router": r_params, "experts": experts.combine(e_list)}
    for mode in ("mixture", "router_only", "expert:1"):
        with pytest.raises(ModeError, match="decode.speculate"):
            SpeculativeDecoder(Mode.parse(mode, 3), router, experts, 4)
    with pytest.raises(ValueError, match="speculate must be >= 1"):
        SpeculativeDecoder(Mode.parse("fusionroute", 3), router, experts, 0)
    dec = SpeculativeDecoder(Mode.parse("fusionroute", 3), router, experts, 4)
    with pytest.raises(CacheOverflowError, match="decode.speculate"):
        dec.generate(params, PROMPTS, 8, eos_ids=[], cache_len=5 + 8)


def test_decode_cli_reports_acceptance(tmp_path, capsys):
    """`python -m fr_jax.decode --config.decode.speculate=3` on the bundled world: the
    summary line and each JSONL record carry the acceptance; a mode it does not serve says
    so and decodes as usual."""
    from fr_jax.decode import main

    out = tmp_path / "out.jsonl"
    res = main(["--config.decode.speculate=3", "--config.decode.max_new_tokens=12",
                "--prompt=add 12+30", f"--output={out}"])
    printed = capsys.readouterr().out
    assert "speculative (k=3):" in printed and "tokens per expert pass" in printed
    rec = json.loads(out.read_text().splitlines()[0])
    assert rec["speculation"]["k"] == 3
    assert rec["speculation"]["passes"] == int(res.spec_passes[0])
    main(["--config.decode.speculate=3", "--config.decode.mode=mixture",
          "--config.decode.max_new_tokens=4", "--prompt=add 1+2"])
    assert "speculative decoding is off for mode mixture" in capsys.readouterr().out
