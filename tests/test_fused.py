"""FusionRoute decoding: the jitted scan against a plain Python-loop reference, per mode."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from fr_jax.inference import Decoder, FusedDecoder
from fr_jax.inference.sampling import Sampling
from fr_jax.routing.experts import Experts
from fr_jax.routing.modes import Mode, ModeError
from fr_jax.routing.router import Router
from fixtures import N_EXPERTS, PROMPTS, build_world, tiny

MODES = ["fusionroute", "expert_only", "router_only", "expert:1", "mixture", "sequence:head"]
WIDTH = 24  # fixed reference buffer: one compile per model; causal attention ignores the tail


def reference_decoder(router, r_params, experts, e_list):
    """Full forward over the growing sequence, no cache; the fusion rule written in numpy."""
    model = experts.models[0]

    @jax.jit
    def all_logits(seq):
        r = router.forward(r_params, seq)
        es = jnp.stack([model.forward(p, seq).logits for p in e_list])
        return r.logits[0], jax.nn.softmax(r.route_logits[0]), es[:, 0]

    def lsm(x):
        m = x.max()
        return x - m - np.log(np.exp(x - m).sum())

    def run(mode, prompt, n):
        seq = np.zeros((1, WIDTH), np.int32)
        seq[0, :len(prompt)] = prompt
        toks, chosen = [], []
        s = None
        for cur in range(len(prompt), len(prompt) + n):
            r_all, w_all, e_all = (np.asarray(x, np.float64) for x in all_logits(jnp.asarray(seq)))
            rl, w, es = r_all[cur - 1], w_all[cur - 1], e_all[:, cur - 1]
            k = int(np.argmax(w))
            if s is None:  # sequence-level: routing weights averaged over the prompt, once
                s = int(np.argmax(w_all[:len(prompt)].mean(0)))
            if mode == "sequence:head":
                scores, c = es[s], s
            elif mode == "fusionroute":
                scores, c = lsm(rl) + lsm(es[k]), k
            elif mode == "expert_only":
                scores, c = es[k], k
            elif mode == "router_only":
                scores, c = rl, -1
            elif mode.startswith("expert:"):
                i = int(mode.split(":")[1])
                scores, c = es[i], i
            else:  # mixture
                scores, c = np.log(sum(wi * np.exp(lsm(e)) for wi, e in zip(w, es))), k
            seq[0, cur] = int(np.argmax(scores))
            toks.append(int(seq[0, cur]))
            chosen.append(c)
        return toks, chosen
    return run


# gemma2's variant (~25 s, compile-bound) runs in the slow tier; llama's stays in the fast one.
@pytest.mark.parametrize("model_type", ["llama", pytest.param("gemma2", marks=pytest.mark.slow)])
def test_scan_decode_matches_python_reference_in_every_mode(model_type):
    router, r_params, experts, e_list = build_world(model_type)
    params = {"router": r_params, "experts": experts.combine(e_list)}
    n = 7
    reference = reference_decoder(router, r_params, experts, e_list)
    saw_switch = False
    for mode in MODES:
        dec = FusedDecoder(Mode.parse(mode, N_EXPERTS), router, experts, chunk=3)
        res = dec.generate(params, PROMPTS, max_new_tokens=n, eos_ids=[])
        for row, prompt in enumerate(PROMPTS):
            toks, chosen = reference(mode, prompt, n)
            assert res.row(row) == (toks, chosen), (mode, row)
            saw_switch |= len(set(chosen)) > 1
    assert saw_switch, "routing never switched experts: the test would not catch a wrong k"


def test_zero_router_head_fusionroute_equals_expert_only():
    router, r_params, experts, e_list = build_world("llama", untied_router=True)
    r_params["backbone"]["lm_head"] = jnp.zeros_like(r_params["backbone"]["lm_head"])
    params = {"router": r_params, "experts": experts.combine(e_list)}
    runs = [FusedDecoder(Mode.parse(m), router, experts, chunk=4).generate(
        params, PROMPTS, 9, eos_ids=[]) for m in ("fusionroute", "expert_only")]
    np.testing.assert_array_equal(runs[0].tokens, runs[1].tokens)
    np.testing.assert_array_equal(runs[0].chosen, runs[1].chosen)


@pytest.mark.slow  # 20-30 s, compile-bound: the fast tier keeps under 6 min
def test_expert_mode_equals_single_model_decode_and_stacked_equals_list():
    router, r_params, experts, e_list = build_world("gemma2")
    stacked = {"router": r_params, "experts": experts.combine(e_list)}
    listed_experts = Experts(experts.cfgs, stacked=False)
    listed = {"router": r_params, "experts": listed_experts.combine(e_list)}
    alone = Decoder(experts.models[0], chunk=4).generate(e_list[2], PROMPTS, 8, eos_ids=[])
    via_mode = FusedDecoder(Mode.parse("expert:2"), router, experts, chunk=4).generate(
        stacked, PROMPTS, 8, eos_ids=[])
    np.testing.assert_array_equal(alone.tokens, via_mode.tokens)
    assert (via_mode.chosen == 2).all()
    a = FusedDecoder(Mode.parse("fusionroute"), router, experts, chunk=4).generate(
        stacked, PROMPTS, 8, eos_ids=[])
    b = FusedDecoder(Mode.parse("fusionroute"), router, listed_experts, chunk=4).generate(
        listed, PROMPTS, 8, eos_ids=[])
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.chosen, b.chosen)
    np.testing.assert_allclose(a.route_probs, b.route_probs, atol=1e-6)


@pytest.mark.slow
def test_batch_rows_equal_prompts_alone_eos_and_chunking():
    router, r_params, experts, e_list = build_world("llama")
    params = {"router": r_params, "experts": experts.combine(e_list)}
    mode = Mode.parse("fusionroute")
    free = FusedDecoder(mode, router, experts, chunk=4).generate(params, PROMPTS, 10, eos_ids=[])
    eos = [int(free.tokens[0, 2]), int(free.tokens[2, 5])]
    for chunk in (1, 3, 16):
        res = FusedDecoder(mode, router, experts, chunk=chunk).generate(
            params, PROMPTS, 10, eos_ids=eos, pad_id=0)
        for row, prompt in enumerate(PROMPTS):
            hits = np.flatnonzero(np.isin(free.tokens[row], eos))
            n = hits[0] + 1 if hits.size else 10
            assert res.lengths[row] == n
            assert res.row(row) == (free.tokens[row, :n].tolist(), free.chosen[row, :n].tolist())
            assert (res.tokens[row, n:] == 0).all() and (res.chosen[row, n:] == -2).all()
            if chunk == 3:  # one row alone gives the same answer as inside the batch
                single = FusedDecoder(mode, router, experts, chunk=chunk).generate(
                    params, [prompt], 10, eos_ids=eos)
                assert single.row(0) == res.row(row)


def test_sampling_is_seeded_and_reproducible():
    router, r_params, experts, e_list = build_world("llama")
    params = {"router": r_params, "experts": experts.combine(e_list)}
    dec = FusedDecoder(Mode.parse("fusionroute"), router, experts, chunk=4,
                       sampling=Sampling(temperature=1.0, top_k=20, top_p=0.9))
    a, b = (dec.generate(params, PROMPTS, 12, eos_ids=[], seed=7) for _ in range(2))
    c = dec.generate(params, PROMPTS, 12, eos_ids=[], seed=8)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert (a.tokens != c.tokens).any()


def test_decoder_refuses_modes_it_cannot_run():
    router, r_params, experts, _ = build_world("llama")
    with pytest.raises(ModeError, match="unknown decode mode 'fusion'"):
        Mode.parse("fusion")
    with pytest.raises(ModeError, match="out of range"):
        Mode.parse("expert:3", N_EXPERTS)
    with pytest.raises(ModeError, match="needs a router"):
        FusedDecoder(Mode.parse("fusionroute"), None, experts)
    with pytest.raises(ModeError, match="3 outputs but 2 experts"):
        FusedDecoder(Mode.parse("fusionroute"), router, Experts(experts.cfgs[:2]))


@pytest.mark.slow  # 20-30 s, compile-bound: the fast tier keeps under 6 min
def test_padded_vocab_tables_are_sliced_to_the_tokenizer():
    """A router whose embedding table is padded (101 rows) next to 97-row experts: logits are
    cut to the tokenizer's 97 ids, and the padding can never be emitted."""
    cfg = tiny("llama")
    router = Router(cfg.replace(vocab_size=101, num_layers=2, layer_types=()), N_EXPERTS)
    r_params = router.init(jax.random.key(0))
    # Make the padded ids the router's favourites: unsliced, fusion would pick them.
    r_params["backbone"]["lm_head"] = r_params["backbone"]["lm_head"].at[:, 97:].set(50.0)
    experts = Experts([cfg] * N_EXPERTS)
    params = {"router": r_params,
              "experts": experts.combine([experts.models[0].init(jax.random.key(i))
                                          for i in range(1, N_EXPERTS + 1)])}
    for vocab in (None, 97):
        dec = FusedDecoder(Mode.parse("fusionroute"), router, experts, vocab=vocab)
        assert dec.vocab == 97
        res = dec.generate(params, PROMPTS, 6, eos_ids=[])
        assert res.tokens.max() < 97
    with pytest.raises(ValueError, match="97 logits but the tokenizer has 101"):
        FusedDecoder(Mode.parse("fusionroute"), router, experts, vocab=101)
