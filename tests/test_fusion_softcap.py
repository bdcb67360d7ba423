"""Gemma-2's final soft-cap and the fusion rule (fusion.softcap): `each` caps every model's
logits before the sum (the default, as the models compute them), `sum` caps the sum of the
raw router and expert logits. Checked against a Python loop over whole-sequence forwards
with the rule written in numpy (decoding, eager and lazy experts), against the fused
log-probs computed from whole logits (training), and for what must not move: a model's
distribution alone is capped either way, so stage 1's loss is the same under both."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fr_jax.config import base_config
from fr_jax.corpus import Batcher, SFTExample
from fr_jax.inference import FusedDecoder
from fr_jax.inference.lineup import leave_cap_to_rule, load_lineup
from fr_jax.routing.experts import Experts
from fr_jax.routing.fusion import next_token_logprobs
from fr_jax.routing.modes import Mode
from fr_jax.routing.router import Router
from fr_jax.runtime.bundle import bundled_world
from fr_jax.runtime.errors import ConfigError
from fr_jax.steps.objectives import fused_stats, sft_loss_fn
from fixtures import N_EXPERTS, PROMPTS, build_world

# tests/fixtures.py's Gemma-2 worlds have cap 3 and logits up to about 3.3, where the two
# orders give the same greedy token 97% of the time: a cap of 1 bites.
CAP = 1.0
WIDTH = 24


def _np_lsm(x):
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def _cap(x):
    return CAP * np.tanh(x / CAP)


def test_the_rule_caps_each_or_the_sum():
    rng = np.random.default_rng(0)
    q, p = (rng.normal(0, 4, (2, 11)).astype(np.float32) for _ in range(2))
    each = next_token_logprobs(jnp.asarray(_cap(q)), jnp.asarray(_cap(p)))
    np.testing.assert_allclose(each, _np_lsm(_np_lsm(_cap(q)) + _np_lsm(_cap(p))), atol=1e-5)
    summed = next_token_logprobs(jnp.asarray(q), jnp.asarray(p), cap=CAP)
    np.testing.assert_allclose(summed, _np_lsm(_cap(q + p)), atol=1e-5)
    assert np.abs(np.asarray(each) - np.asarray(summed)).max() > 0.1  # they differ here
    # alone (no router logits), the model's own capped distribution either way
    np.testing.assert_allclose(next_token_logprobs(None, jnp.asarray(p), cap=CAP),
                               _np_lsm(_cap(p)), atol=1e-5)


def _raw_world():
    router, r_params, experts, e_list = build_world("gemma2")
    assert router.cfg.final_logit_softcap == 3.0
    router = Router(router.cfg.replace(final_logit_softcap=CAP), router.n_experts)
    experts = Experts([c.replace(final_logit_softcap=CAP) for c in experts.cfgs])
    raw_router, raw_experts = leave_cap_to_rule(router, experts)
    return (router, experts), (raw_router, raw_experts), r_params, e_list


@pytest.mark.slow  # ~20 s, compile-bound
def test_raw_models_leave_the_cap_out_and_keep_it_for_the_rule():
    (router, experts), (raw_router, raw_experts), r_params, e_list = _raw_world()
    assert raw_router.cfg.raw_logits and all(c.raw_logits for c in raw_experts.cfgs)
    assert raw_router.cfg.final_logit_softcap == CAP  # what the rule and the export use
    tokens = jnp.asarray([PROMPTS[0]], jnp.int32)
    capped = router.forward(r_params, tokens).logits
    raw = raw_router.forward(r_params, tokens).logits
    assert np.abs(np.asarray(raw)).max() > CAP  # the cap bites on these weights
    np.testing.assert_allclose(capped, _cap(np.asarray(raw)), rtol=1e-5, atol=1e-5)
    # Llama has no cap to move: refused with the fix, through the lineup loader.
    world = bundled_world()
    with pytest.raises(ConfigError, match="fusion.softcap=sum.*have none.*fusion.softcap=each"):
        load_lineup(world["router"], world["experts"], softcap="sum")


def _reference(raw_router, r_params, raw_experts, e_list):
    """Greedy tokens and chosen experts from whole-sequence forwards (no cache) of the raw
    models, the `sum` rule written in numpy."""
    model = raw_experts.models[0]

    @jax.jit
    def all_logits(seq):
        r = raw_router.forward(r_params, seq)
        es = jnp.stack([model.forward(p, seq).logits for p in e_list])
        return r.logits[0], r.route_logits[0], es[:, 0]

    def run(mode, prompt, n):
        seq = np.zeros((1, WIDTH), np.int32)
        seq[0, :len(prompt)] = prompt
        toks, chosen = [], []
        for cur in range(len(prompt), len(prompt) + n):
            r_all, route_all, e_all = (np.asarray(x, np.float64)
                                       for x in all_logits(jnp.asarray(seq)))
            rl, route, es = r_all[cur - 1], route_all[cur - 1], e_all[:, cur - 1]
            k = int(np.argmax(route))
            scores = _cap(rl + es[k]) if mode == "fusionroute" else _cap(es[k])
            seq[0, cur] = int(np.argmax(scores))
            toks.append(int(seq[0, cur]))
            chosen.append(k)
        return toks, chosen
    return run


@pytest.mark.slow  # ~30 s, compile-bound
def test_decoding_with_the_sum_capped_equals_the_python_reference_eager_and_lazy():
    (router, experts), (raw_router, raw_experts), r_params, e_list = _raw_world()
    params = {"router": r_params, "experts": raw_experts.combine(e_list)}
    reference = _reference(raw_router, r_params, raw_experts, e_list)
    n = 7
    differs = False
    for mode in ("fusionroute", "expert_only"):
        for lazy in (False, True):
            dec = FusedDecoder(Mode.parse(mode, N_EXPERTS), raw_router, raw_experts, chunk=3,
                               lazy_experts=lazy)
            res = dec.generate(params, PROMPTS, max_new_tokens=n, eos_ids=[])
            for row, prompt in enumerate(PROMPTS):
                assert res.row(row) == reference(mode, prompt, n), (mode, lazy, row)
        each = FusedDecoder(Mode.parse(mode, N_EXPERTS), router, experts, chunk=3).generate(
            {"router": r_params, "experts": experts.combine(e_list)}, PROMPTS,
            max_new_tokens=n, eos_ids=[])
        if mode == "expert_only":  # one model's capped distribution: the same tokens
            np.testing.assert_array_equal(each.tokens, res.tokens)
        else:
            differs |= not np.array_equal(each.tokens, res.tokens)
    assert differs, "the two orders gave the same FusionRoute tokens: the test would not see"


@pytest.mark.slow  # ~20 s, compile-bound
def test_training_s_fused_policy_caps_the_sum_and_the_sft_loss_does_not_move():
    (router, experts), (raw_router, raw_experts), r_params, e_list = _raw_world()
    e_params = raw_experts.combine(e_list)
    rng = np.random.default_rng(1)
    examples = [SFTExample(rng.integers(3, 97, k).astype(np.int32),
                           np.r_[np.zeros(4), np.ones(k - 4)].astype(np.int32))
                for k in rng.integers(8, 20, 8)]
    batch = Batcher(examples, 4, WIDTH, seed=0).next()
    args = (batch["tokens"], batch["positions"], batch["segment_ids"])
    out = raw_router.forward(r_params, *args, with_logits=True)
    e_hidden = raw_experts.hidden(e_params, *args)
    selected = jnp.argmax(out.route_logits, axis=-1)
    lp = fused_stats(raw_router, r_params, out.hidden, raw_experts, e_params, e_hidden,
                     selected, batch["targets"], 97, 0).logprob
    es = np.stack([np.asarray(raw_experts.models[0].forward(p, *args).logits) for p in e_list])
    picked = np.take_along_axis(es, np.asarray(selected)[None, :, :, None], axis=0)[0]
    fused = _np_lsm(_cap(np.asarray(out.logits, np.float64)[..., :97] + picked[..., :97]))
    want = np.take_along_axis(fused, np.asarray(batch["targets"])[..., None], -1)[..., 0]
    mask = np.asarray(batch["segment_ids"]) > 0
    np.testing.assert_allclose(np.asarray(lp)[mask], want[mask], atol=1e-4)

    # Stage 1 reads each model alone (the router's LM, the experts' signals): capped under
    # both settings, the same loss.
    cfg = base_config().train.sft
    frozen = {"experts": e_params}
    each = sft_loss_fn(router, experts, 97, cfg)(r_params, frozen, batch)[1]
    summed = sft_loss_fn(raw_router, raw_experts, 97, cfg)(r_params, frozen, batch)[1]
    for k in ("loss", "route_loss", "lm_loss", "route_acc"):
        np.testing.assert_allclose(each[k], summed[k], rtol=1e-5, err_msg=k)


def test_the_setting_reaches_the_lineup_from_the_command_line():
    from fr_jax.decode import main as decode_main
    with pytest.raises(SystemExit, match="fusion.softcap=sum.*have none"):
        decode_main(["--prompt=add 1+2", "--config.fusion.softcap=sum"])
