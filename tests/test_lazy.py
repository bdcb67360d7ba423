"""Lazy experts: only the router and the selected expert run per step; a skipped expert
catches up when selected again. Checked against the eager schedule (every expert every
step): the same greedy tokens, and after the final catch-up the same caches."""

import numpy as np
import pytest

import jax

from fr_jax.inference import FusedDecoder, catch_up_widths
from fr_jax.routing.modes import Mode
from fixtures import N_EXPERTS, PROMPTS, build_world, mixed_selector

WIDTH = 2  # catch-up chunk width: real routing below leaves gaps both shorter and longer
N_NEW = 14


def _pair(mode, router, experts, params, prompts=PROMPTS, eos_ids=(), **kw):
    """(eager, lazy) results of one configuration, caches returned."""
    out = []
    for lazy in (False, True):
        dec = FusedDecoder(Mode.parse(mode, N_EXPERTS), router, experts, chunk=4,
                           lazy_experts=lazy, catch_up_width=WIDTH, **kw)
        out.append(dec.generate(params, prompts, N_NEW, eos_ids=list(eos_ids),
                                return_caches=True))
    return out


def _reads(chosen_rows):
    """Per run of an expert, the tokens it reads before giving the logits of the current
    position: those it missed since it last ran for the batch, and the current one (every
    expert reads the prompt; the first token comes from the prefill; a running expert keeps
    every row in step)."""
    reads, last = [], {}
    for i in range(1, max(len(r) for r in chosen_rows)):
        for e in sorted({r[i] for r in chosen_rows if i < len(r) and r[i] >= 0}):
            reads.append(i - last.get(e, 0))
            last[e] = i
    return reads


def _assert_same_caches(eager, lazy, experts, n_rows):
    """Every expert's cache after the final catch-up holds what the eager cache holds: the
    same positions in the same slots, the same keys and values (the lazy cache has spare
    slots past the end, which hold nothing)."""
    _, e_caches, _, _ = eager.caches
    _, l_caches, _, l_step = lazy.caches
    # every expert has read every row's fed tokens (t: per row)
    assert np.all(np.asarray(l_step.synced) == np.asarray(l_step.t)[None, :])
    for e in range(experts.n):
        ec = jax.tree.map(lambda x: np.asarray(x[e]), e_caches) if experts.stacked else \
            jax.tree.map(np.asarray, e_caches[e])
        lc = jax.tree.map(np.asarray, l_caches[e])
        np.testing.assert_array_equal(lc.end, ec.end)
        np.testing.assert_array_equal(lc.next_pos, ec.next_pos)
        for b in range(n_rows):
            end = int(ec.end[b])
            np.testing.assert_array_equal(lc.pos[b, :end], ec.pos[b, :end])
            assert np.all(lc.pos[b, end:] == -1)
            valid = ec.pos[b, :end] >= 0
            for name in ("k", "v"):
                got, want = getattr(lc, name)[b, :, :, :end], getattr(ec, name)[b, :, :, :end]
                np.testing.assert_allclose(got[:, :, valid], want[:, :, valid], rtol=1e-5,
                                           atol=1e-5)


def test_catch_up_widths():
    assert catch_up_widths(1) == (1,)
    assert catch_up_widths(3) == (1, 2, 3)
    assert catch_up_widths(8) == (1, 2, 4, 8)


@pytest.mark.slow
@pytest.mark.parametrize("model_type", ["llama", "gemma2"])
def test_lazy_equals_eager_with_real_routing(model_type):
    """Rows that pick different experts, gaps shorter and longer than the chunk width
    (Gemma-2: sliding window 4, so catch-up chunks straddle the window), a row that stops
    at EOS early; tokens equal, and the caches after the final catch-up equal."""
    router, r_params, experts, e_list = build_world(model_type)
    params = {"router": r_params, "experts": experts.combine(e_list)}
    free, _ = _pair("fusionroute", router, experts, params)
    eos = free.row(0)[0][3]  # FusionRoute's row 0 ends after its 4th token
    for mode, eos_ids in (("fusionroute", [eos]), ("expert_only", [])):
        eager, lazy = _pair(mode, router, experts, params, eos_ids=eos_ids)
        rows = [eager.row(b) for b in range(len(PROMPTS))]
        assert [lazy.row(b) for b in range(len(PROMPTS))] == rows, mode
        if eos_ids:  # the row that stopped early is in the test
            assert eager.lengths[0] == 4 and eager.lengths.max() == N_NEW
        chosen = [c for _, c in rows]
        reads = _reads(chosen)  # one chunk (a gap, W at most) and several chunks
        assert any(1 < n <= WIDTH for n in reads) and max(reads) > WIDTH, reads
        assert len({tuple(c[:4]) for c in chosen}) > 1  # rows differ in their experts
        _assert_same_caches(eager, lazy, experts, len(PROMPTS))


@pytest.mark.slow
@pytest.mark.parametrize("model_type", ["llama", "gemma2"])
def test_lazy_equals_eager_under_forced_routing_patterns(model_type):
    """Sticky runs, alternation every token, and a gap of 11 tokens (six chunks of 2)."""
    router, r_params, experts, e_list = build_world(model_type, seed=1)
    params = {"router": r_params, "experts": experts.combine(e_list)}
    for schedule in [(1,), (0, 2), (0,) * 11 + (2, 1, 1)]:
        eager, lazy = _pair("fusionroute", router, experts, params, route_schedule=schedule)
        for b in range(len(PROMPTS)):
            assert lazy.row(b) == eager.row(b), (schedule, b)
            assert eager.row(b)[1] == [schedule[i % len(schedule)] for i in range(N_NEW)]
        _assert_same_caches(eager, lazy, experts, len(PROMPTS))


@pytest.mark.slow
def test_lazy_sequence_modes_and_listed_experts():
    """sequence:head (one expert per prompt) and sequence (a SharedTrunkNet picks an expert
    or FusionRoute per prompt) with lazy experts; experts of different shapes (a list, not
    stacked) take the same path."""
    from fr_jax.routing.experts import Experts

    router, r_params, experts, e_list = build_world("llama", seed=2)
    params = {"router": r_params, "experts": experts.combine(e_list)}
    eager, lazy = _pair("sequence:head", router, experts, params)
    assert [lazy.row(b) for b in range(3)] == [eager.row(b) for b in range(3)]

    sel = mixed_selector(router, r_params)
    params["selector"] = sel.params(r_params["backbone"])
    eager, lazy = _pair("sequence", router, experts, params, selector=sel)
    assert [lazy.row(b) for b in range(3)] == [eager.row(b) for b in range(3)]
    np.testing.assert_allclose(lazy.route_probs, eager.route_probs, rtol=1e-5, atol=1e-6)

    listed = Experts(experts.cfgs, stacked=False)
    params_l = {"router": r_params, "experts": listed.combine(e_list)}
    eager, lazy = _pair("expert_only", router, listed, params_l)
    assert [lazy.row(b) for b in range(3)] == [eager.row(b) for b in range(3)]
    _assert_same_caches(eager, lazy, listed, 3)


def test_lazy_is_off_where_it_cannot_help():
    router, r_params, experts, e_list = build_world("llama")
    for mode, lazy in [("fusionroute", True), ("mixture", False), ("expert:1", False),
                       ("router_only", False)]:
        dec = FusedDecoder(Mode.parse(mode, 3), router, experts, lazy_experts=True)
        assert dec.lazy is lazy, mode
    with pytest.raises(ValueError, match="catch_up_width"):
        FusedDecoder(Mode.parse("fusionroute"), router, experts, lazy_experts=True,
                     catch_up_width=0)
    with pytest.raises(ValueError, match="route_schedule"):
        FusedDecoder(Mode.parse("fusionroute"), router, experts, route_schedule=(0, 3))
