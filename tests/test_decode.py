"""The chunked, jitted greedy decode loop against a plain re-run-the-whole-sequence loop."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from fr_jax.decode import main
from fr_jax.inference import Decoder
from fr_jax.models import CacheOverflowError, Model
from fixtures import scaled_params as _scaled_params, tiny


def reference_greedy(model, params, prompt, n):
    """Re-runs the whole sequence through the cache-free forward for every new token.
    The buffer has a fixed width (one compile); causal attention ignores what lies beyond
    the current token."""
    seq = np.zeros((1, len(prompt) + n), np.int32)
    seq[0, :len(prompt)] = prompt
    forward = jax.jit(model.forward)
    for cur in range(len(prompt), len(prompt) + n):
        seq[0, cur] = int(jnp.argmax(forward(params, jnp.asarray(seq)).logits[0, cur - 1]))
    return seq[0, len(prompt):].tolist()


@pytest.mark.parametrize("model_type", ["llama", "gemma2"])
def test_greedy_decode_matches_reference(model_type):
    model = Model(tiny(model_type))
    params = _scaled_params(model, seed=4)
    prompts = [[5, 9, 11, 40, 2 + 3], [17], [60, 61, 62]]
    res = Decoder(model, chunk=4).generate(params, prompts, max_new_tokens=9, eos_ids=[])
    assert res.tokens.shape == (3, 9)
    for row, p in enumerate(prompts):
        assert res.tokens[row].tolist() == reference_greedy(model, params, p, 9)


def test_rows_stop_at_eos_and_loop_stops_when_all_done():
    model = Model(tiny("llama"))
    params = _scaled_params(model, seed=4)
    prompts = [[5, 9, 11], [17, 3]]
    free = Decoder(model, chunk=2).generate(params, prompts, max_new_tokens=12, eos_ids=[])
    # Make row 0's third token and row 1's fifth token the stop ids.
    eos = [int(free.tokens[0, 2]), int(free.tokens[1, 4])]
    res = Decoder(model, chunk=2).generate(params, prompts, max_new_tokens=12, eos_ids=eos, pad_id=0)
    for row in range(2):
        hits = np.flatnonzero(np.isin(free.tokens[row], eos))
        n = hits[0] + 1
        assert res.lengths[row] == n
        assert res.tokens[row, :n].tolist() == free.tokens[row, :n].tolist()
        assert (res.tokens[row, n:] == 0).all()
    assert res.steps < free.steps  # the host stopped the scan early


def test_prompt_longer_than_cache_is_a_clear_error():
    model = Model(tiny("llama"))
    params = model.init(jax.random.key(0))
    with pytest.raises(CacheOverflowError, match="need .* cache slots but the cache has 8"):
        Decoder(model).generate(params, [[1] * 6], max_new_tokens=10, eos_ids=[], cache_len=8)


@pytest.mark.parametrize("arg,message", [
    ("--config.decode.bogus=4", "^unknown config field decode.bogus.*--helpfull lists every field$"),
    ("--config.decode.max_new_tokens=abc", "max_new_tokens=abc.*int"),
    ("--config=no/such/config.py", "no/such/config.py"),
    ("--config.experts.paths=('/no/such/ckpt',)",
     "error: checkpoint folder '/no/such/ckpt' does not exist"),
])
def test_cli_bad_input_is_one_clear_message(arg, message):
    with pytest.raises(SystemExit, match=message):
        main([arg])
