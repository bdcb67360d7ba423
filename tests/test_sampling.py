"""Sampling: top-k / top-p keep exactly the allowed set, draws never leave it, seeds repeat."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from fr_jax.inference.sampling import Sampling, filter_logits, sample

# A distribution built for the test: probabilities 0.4, 0.25, 0.15, 0.1, 0.05, 0.03, 0.02.
PROBS = np.array([0.05, 0.4, 0.02, 0.15, 0.25, 0.1, 0.03])
LOGITS = jnp.log(jnp.asarray(PROBS))[None]


@pytest.mark.parametrize("top_k,top_p,allowed", [
    (3, 1.0, {1, 4, 3}),
    (0, 0.5, {1, 4}),  # 0.4 < 0.5, 0.4 + 0.25 reaches it
    (0, 0.75, {1, 4, 3}),  # 0.4 + 0.25 = 0.65 < 0.75, adding 0.15 reaches it
    (0, 0.01, {1}),  # the most likely token always stays
    (2, 0.9, {1, 4}),
])
def test_filter_keeps_exactly_the_allowed_set(top_k, top_p, allowed):
    kept = np.flatnonzero(np.isfinite(np.asarray(filter_logits(LOGITS, top_k, top_p)[0])))
    assert set(kept.tolist()) == allowed
    draws = sample(jnp.repeat(LOGITS, 4000, axis=0), jax.random.key(0),
                   Sampling(temperature=1.0, top_k=top_k, top_p=top_p))
    seen = set(np.asarray(draws).tolist())
    assert seen <= allowed and len(seen) == len(allowed)


def test_seeded_sampling_repeats_and_temperature_zero_is_greedy():
    logits = jnp.repeat(LOGITS, 64, axis=0)
    s = Sampling(temperature=1.0)
    a, b = sample(logits, jax.random.key(3), s), sample(logits, jax.random.key(3), s)
    np.testing.assert_array_equal(a, b)
    assert (np.asarray(sample(logits, jax.random.key(4), s)) != np.asarray(a)).any()
    assert (np.asarray(sample(logits, jax.random.key(3), Sampling())) == 1).all()


def test_bad_sampling_settings_are_refused():
    with pytest.raises(ValueError, match="top_p must be in"):
        Sampling(temperature=1.0, top_p=0.0)
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        Sampling(temperature=-1.0)
