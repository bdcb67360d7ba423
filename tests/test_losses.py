"""Stage-1 and stage-2 losses against straightforward NumPy references."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from fr_jax.steps import losses

RNG = np.random.default_rng(0)
N, B, T, V = 3, 2, 5, 7


def np_log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def inputs():
    lm = RNG.normal(size=(B, T, V)) * 2
    route = RNG.normal(size=(B, T, N)) * 2
    expert = RNG.normal(size=(N, B, T, V)) * 3
    # Make experts agree at a few positions so the informative mask has both values.
    expert[:, 0, 1] = expert[0, 0, 1]
    expert[:, 1, 3] = expert[0, 1, 3]
    targets = RNG.integers(0, V, (B, T))
    mask = np.array([[0, 1, 1, 1, 1], [0, 0, 1, 1, 0]], np.float32)
    return lm, route, expert, targets, mask


def test_informative_mask_matches_definition():
    _, _, expert, targets, mask = inputs()
    sig = losses.expert_signals(jnp.asarray(expert), jnp.asarray(targets))
    got = np.asarray(losses.informative_mask(sig.top1, jnp.asarray(mask)))
    top1 = expert.argmax(-1)  # [N, B, T]
    want = np.zeros((B, T), bool)
    for b in range(B):
        for t in range(T):
            want[b, t] = mask[b, t] > 0 and len(set(top1[:, b, t])) > 1
    np.testing.assert_array_equal(got, want)
    assert want.any() and (~want & (mask > 0)).any()


@pytest.mark.parametrize("kind", ["mixture", "best_expert"])
def test_sft_and_routing_loss_match_numpy(kind):
    lm, route, expert, targets, mask = inputs()
    sig = losses.expert_signals(jnp.asarray(expert), jnp.asarray(targets))
    loss, m = losses.sft_loss(jnp.asarray(lm), jnp.asarray(route), jnp.asarray(targets),
                              jnp.asarray(mask), sig, lm_weight=0.7, routing=kind)
    p = np.exp(np_log_softmax(expert))  # [N, B, T, V]
    w = np.exp(np_log_softmax(route))  # [B, T, N]
    q = np.exp(np_log_softmax(lm))
    top1 = expert.argmax(-1)
    route_terms, lm_terms, hits = [], [], []
    for b in range(B):
        for t in range(T):
            if mask[b, t] == 0:
                continue
            y = targets[b, t]
            lm_terms.append(-np.log(q[b, t, y]))
            if len(set(top1[:, b, t])) > 1:
                best = int(np.argmax(p[:, b, t, y]))
                if kind == "mixture":
                    route_terms.append(-np.log(sum(w[b, t, i] * p[i, b, t, y] for i in range(N))))
                else:
                    route_terms.append(-np.log(w[b, t, best]))
                hits.append(int(np.argmax(w[b, t])) == best)
    want = np.mean(route_terms) + 0.7 * np.mean(lm_terms)
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    np.testing.assert_allclose(float(m["route_loss"]), np.mean(route_terms), rtol=1e-5)
    np.testing.assert_allclose(float(m["lm_loss"]), np.mean(lm_terms), rtol=1e-5)
    np.testing.assert_allclose(float(m["route_acc"]), np.mean(hits), rtol=1e-6)
    np.testing.assert_allclose(float(m["informative_frac"]), len(route_terms) / mask.sum())
    np.testing.assert_allclose(float(np.sum(m["route_share"])), 1.0, rtol=1e-6)


@pytest.mark.parametrize("target,positions", [("fused", "all"), ("fused", "informative"),
                                              ("mix", "all"), ("mix", "informative")])
def test_generator_term_on_the_fused_policy_matches_numpy(target, positions):
    """L_lm of the fused policy log_softmax(lsm q + lsm p_k), k the routing head's argmax,
    over all response tokens or the informative ones; mix weighs it against q's own NLL."""
    lm, route, expert, targets, mask = inputs()
    sig = losses.expert_signals(jnp.asarray(expert), jnp.asarray(targets))
    sel = jnp.argmax(jnp.asarray(route), axis=-1)
    fused_lp = losses.fused_logprob(jnp.asarray(lm),
                                    losses.select_per_token(jnp.asarray(expert), sel),
                                    jnp.asarray(targets))
    fused = losses.TokenStats(fused_lp, jnp.zeros_like(sel))
    loss, m = losses.sft_loss(jnp.asarray(lm), jnp.asarray(route), jnp.asarray(targets),
                              jnp.asarray(mask), sig, lm_weight=0.7, fused=fused,
                              lm_target=target, lm_mix=0.25, lm_positions=positions)
    q = np_log_softmax(lm)
    top1 = expert.argmax(-1)
    own, fused_terms = [], []
    for b in range(B):
        for t in range(T):
            if mask[b, t] == 0:
                continue
            y = targets[b, t]
            own.append(-q[b, t, y])
            if positions == "all" or len(set(top1[:, b, t])) > 1:
                k = int(np.argmax(route[b, t]))
                f = np_log_softmax(q[b, t] + np_log_softmax(expert[k, b, t]))
                fused_terms.append(-f[y])
    want_lm = np.mean(fused_terms) if target == "fused" else \
        0.75 * np.mean(own) + 0.25 * np.mean(fused_terms)
    np.testing.assert_allclose(float(m["fused_loss"]), np.mean(fused_terms), rtol=1e-5)
    np.testing.assert_allclose(float(m["lm_loss"]), np.mean(own), rtol=1e-5)
    np.testing.assert_allclose(float(m["generator_loss"]), want_lm, rtol=1e-5)
    np.testing.assert_allclose(float(loss), float(m["route_loss"]) + 0.7 * want_lm, rtol=1e-5)


def test_an_unknown_generator_target_is_refused():
    lm, route, expert, targets, mask = inputs()
    sig = losses.expert_signals(jnp.asarray(expert), jnp.asarray(targets))
    with pytest.raises(ValueError, match="lm_target"):
        losses.sft_loss(jnp.asarray(lm), jnp.asarray(route), jnp.asarray(targets),
                        jnp.asarray(mask), sig, lm_target="both")


def _cdpo_numpy(pc, pr, rc, rr, beta):
    margin = beta * ((pc - rc) - (pr - rr))
    return np.mean(np.log1p(np.exp(-margin)))


def test_cdpo_loss_matches_numpy_and_flips_with_a_swap():
    lm_c, lm_r = RNG.normal(size=(2, B, T, V)) * 2
    ref_c, ref_r = RNG.normal(size=(2, B, T, V)) * 2
    _, _, expert, targets, mask = inputs()
    sel = RNG.integers(0, N, (B, T))
    args = [jnp.asarray(x) for x in (expert, sel, targets, mask)]

    def seq(router_logits, e, s, y, m):
        sel_logits = losses.select_per_token(e, s)
        return losses.sequence_logprob(losses.fused_logprob(router_logits, sel_logits, y), m)

    pc, pr, rc, rr = (seq(jnp.asarray(x), *args) for x in (lm_c, lm_r, ref_c, ref_r))
    # NumPy fused log-prob: log_softmax(lsm(q) + lsm(p_k)) at y, summed over the response.
    def np_seq(router_logits):
        e_k = np.take_along_axis(expert, sel[None, :, :, None], axis=0)[0]
        lp = np_log_softmax(np_log_softmax(router_logits) + np_log_softmax(e_k))
        return (np.take_along_axis(lp, targets[..., None], -1)[..., 0] * mask).sum(-1)
    np.testing.assert_allclose(np.asarray(pc), np_seq(lm_c), rtol=1e-5)
    loss, m = losses.cdpo_loss(pc, pr, rc, rr, beta=0.3)
    np.testing.assert_allclose(float(loss), _cdpo_numpy(*(np.asarray(x) for x in (pc, pr, rc, rr)),
                                                        0.3), rtol=1e-5)
    swapped, m2 = losses.cdpo_loss(pr, pc, rr, rc, beta=0.3)
    np.testing.assert_allclose(float(m2["reward_margin"]), -float(m["reward_margin"]), rtol=1e-6)
    # DPO's sign flip: L(swap) - L = the mean margin (softplus(x) - softplus(-x) = x).
    np.testing.assert_allclose(float(swapped) - float(loss), float(m["reward_margin"]), rtol=1e-5)


def test_cdpo_gives_no_gradient_to_the_experts():
    _, _, expert, targets, mask = inputs()
    sel = jnp.asarray(RNG.integers(0, N, (B, T)))
    lm_c, lm_r = (jnp.asarray(RNG.normal(size=(B, T, V))) for _ in range(2))

    def loss_fn(lm_c, expert):
        e_k = losses.select_per_token(expert, sel)
        pc = losses.sequence_logprob(losses.fused_logprob(lm_c, e_k, targets), mask)
        pr = losses.sequence_logprob(losses.fused_logprob(lm_r, e_k, targets), mask)
        return losses.cdpo_loss(pc, pr, jnp.zeros(B), jnp.zeros(B))[0]

    g_router, g_expert = jax.grad(loss_fn, argnums=(0, 1))(lm_c, jnp.asarray(expert))
    assert np.abs(np.asarray(g_expert)).max() == 0.0
    assert np.abs(np.asarray(g_router)).max() > 0.0
