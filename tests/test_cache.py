"""Cached decoding (prefill + steps) equals a full forward pass, for left-padded batches."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from fixtures import scaled_params as _scaled_params, tiny
from fr_jax.models import CacheOverflowError, Model

TOL = 1e-5


@pytest.mark.parametrize("model_type", ["llama", pytest.param("gemma2", marks=pytest.mark.slow)])
def test_prefill_and_steps_match_forward(model_type):
    model = Model(tiny(model_type))
    params = _scaled_params(model)
    rng = np.random.default_rng(1)
    lengths = [5, 9, 2]
    n_steps = 7
    width = max(lengths)
    seqs = [rng.integers(3, 97, n + n_steps) for n in lengths]

    # Left-padded prompt batch.
    tokens = np.zeros((3, width), np.int32)
    mask = np.zeros((3, width), bool)
    for b, n in enumerate(lengths):
        tokens[b, width - n:] = seqs[b][:n]
        mask[b, width - n:] = True
    cache = model.init_cache(3, width + n_steps)
    out, cache = jax.jit(model.prefill)(params, jnp.asarray(tokens), cache, jnp.asarray(mask))
    cached = [[np.asarray(out.logits[b, -1])] for b in range(3)]
    step = jax.jit(model.step)
    for s in range(n_steps - 1):
        tok = jnp.asarray([seqs[b][lengths[b] + s] for b in range(3)], jnp.int32)
        out, cache = step(params, tok, cache)
        for b in range(3):
            cached[b].append(np.asarray(out.logits[b]))
    np.testing.assert_array_equal(np.asarray(cache.next_pos), np.array(lengths) + n_steps - 1)

    for b, n in enumerate(lengths):
        full = model.forward(params, jnp.asarray(seqs[b][None, : n + n_steps - 1]))
        ref = np.asarray(full.logits[0, n - 1:])
        diff = np.abs(np.stack(cached[b]) - ref).max()
        assert diff <= TOL, (b, diff)


@pytest.mark.parametrize("model_type", ["llama", pytest.param("gemma2", marks=pytest.mark.slow)])
def test_chunked_prefill_matches_single_prefill(model_type):
    """Appending a prompt in chunks (multi-turn, lazy-expert catch-up) == one prefill."""
    model = Model(tiny(model_type))
    params = _scaled_params(model, seed=2)
    tokens = jnp.asarray(np.random.default_rng(3).integers(3, 97, (2, 13)), jnp.int32)
    one, _ = model.prefill(params, tokens, model.init_cache(2, 16))
    cache = model.init_cache(2, 16)
    parts = []
    for lo, hi in ((0, 5), (5, 6), (6, 13)):
        out, cache = model.extend(params, tokens[:, lo:hi], cache)
        parts.append(out.logits)
    np.testing.assert_allclose(np.concatenate(parts, 1), one.logits, atol=TOL, rtol=0)


def test_cache_is_a_scan_carry():
    model = Model(tiny("gemma2"))
    params = _scaled_params(model)
    prompt = jnp.asarray([[5, 6, 7, 8]], jnp.int32)
    out, cache = model.prefill(params, prompt, model.init_cache(1, 12))

    def body(carry, _):
        tok, cache = carry
        out, cache = model.step(params, tok, cache)
        nxt = jnp.argmax(out.logits, -1).astype(jnp.int32)
        return (nxt, cache), nxt

    first = jnp.argmax(out.logits[:, -1], -1).astype(jnp.int32)
    (_, cache), toks = jax.jit(lambda c: jax.lax.scan(body, c, None, length=6))((first, cache))
    seq = jnp.concatenate([prompt, first[:, None], toks.T[:, :-1]], axis=1)
    ref = jnp.argmax(model.forward(params, seq).logits[:, 3:], -1)
    np.testing.assert_array_equal(np.asarray(ref),
                                  np.asarray(jnp.concatenate([first[:, None], toks.T], 1)))
    assert int(cache.end[0]) == 10


def test_prompt_longer_than_cache_is_a_clear_error():
    model = Model(tiny("llama"))
    params = model.init(jax.random.key(0))
    with pytest.raises(CacheOverflowError, match="max_len"):
        model.prefill(params, jnp.zeros((1, 20), jnp.int32), model.init_cache(1, 16))
    _, cache = model.prefill(params, jnp.zeros((1, 16), jnp.int32), model.init_cache(1, 16))
    with pytest.raises(CacheOverflowError, match="16 of 16"):
        model.step(params, jnp.zeros((1,), jnp.int32), cache)


@pytest.mark.parametrize("model_type", ["llama", "gemma2"])
def test_right_padded_catch_up_chunks_match_the_full_forward(model_type):
    """`Model.catch_up`: rows read different numbers of tokens per call (0 included) from a
    right-padded chunk; each row's offset moves by its real tokens only, so a cache with one
    chunk of spare slots holds the whole sequence, and the logits of each row's last real
    token equal the full forward's (Gemma-2: the window of 4 spans the chunks)."""
    model = Model(tiny(model_type))
    params = _scaled_params(model)
    rng = np.random.default_rng(2)
    w, total = 4, 15
    seqs = rng.integers(3, 97, (2, total))
    reads = [[3, 0, 4, 1, 4, 2, 1], [1, 4, 4, 0, 2, 3, 1]]  # tokens per call, per row
    assert all(sum(r) == total for r in reads)
    cache = model.init_cache(2, total + w)
    catch_up = jax.jit(model.catch_up)
    done = np.zeros(2, int)
    full = [np.asarray(model.forward(params, jnp.asarray(seqs[b][None])).logits[0])
            for b in range(2)]
    for call in range(len(reads[0])):
        n = np.array([reads[b][call] for b in range(2)])
        chunk = np.zeros((2, w), np.int32)
        for b in range(2):
            chunk[b, :n[b]] = seqs[b][done[b]:done[b] + n[b]]
        out, cache = catch_up(params, jnp.asarray(chunk), jnp.asarray(n, jnp.int32), cache)
        done += n
        for b in range(2):
            if n[b]:
                diff = np.abs(np.asarray(out.logits[b, 0]) - full[b][done[b] - 1]).max()
                assert diff <= TOL, (call, b, diff)
    np.testing.assert_array_equal(np.asarray(cache.end), [total, total])
    np.testing.assert_array_equal(np.asarray(cache.pos)[:, :total], np.tile(np.arange(total), (2, 1)))
    assert np.all(np.asarray(cache.pos)[:, total:] == -1)
