"""The serving engine's continuous batching (fr_jax/serving/engine.py), checked against the
offline decoder: more requests than slots, of mixed prompt and answer lengths, admitted as
slots free up, each with the tokens and experts `generate` gives its prompt alone; a
sampled request draws the same tokens whatever else shares the batch. The same for the
speculative engine (decode.speculate), against plain decoding."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from fr_jax.inference import FusedDecoder, SpeculativeDecoder
from fr_jax.inference.sampling import Sampling, sample, sample_rows
from fr_jax.routing.modes import Mode
from fr_jax.runtime import sharding as sh
from fr_jax.runtime.errors import CacheOverflowError
from fr_jax.serving.engine import Engine, Request, default_buckets
from fr_jax.serving.spec_engine import SpeculativeEngine, make_engine
from fixtures import N_EXPERTS, build_world

CACHE = 64
BUCKETS = (8, 16)
# Prompts of 1..13 tokens and answers of 1..11 tokens; some end early on the end id.
PROMPTS = [[(7 * i + 3 * j) % 90 + 5 for j in range(1 + (5 * i) % 13)] for i in range(10)]
MAX_TOKENS = [1 + (3 * i) % 11 for i in range(10)]
EOS = (12,)


@pytest.fixture(scope="module")
def world():
    router, r_params, experts, e_list = build_world("llama")
    return router, experts, {"router": r_params, "experts": experts.combine(e_list)}


def _engine(world, mode="fusionroute", lazy=True, slots=3, eos_ids=EOS):
    """(decoder, params, an engine of `slots` slots on it)."""
    router, experts, params = world
    dec = FusedDecoder(Mode.parse(mode, N_EXPERTS), router, experts, chunk=4,
                       lazy_experts=lazy, catch_up_width=2)
    return dec, params, Engine(dec, params, slots=slots, cache_len=CACHE, eos_ids=eos_ids,
                               pad_id=0, buckets=BUCKETS)


@pytest.mark.slow
@pytest.mark.parametrize("mode,lazy", [("fusionroute", True), ("fusionroute", False),
                                       ("expert_only", True), ("router_only", False)])
def test_each_request_gets_the_tokens_and_experts_it_gets_alone(world, mode, lazy):
    dec, params, engine = _engine(world, mode, lazy)
    reqs = engine.run([Request(p, n) for p, n in zip(PROMPTS, MAX_TOKENS)])
    assert engine.idle and engine.active == 0
    for p, n, r in zip(PROMPTS, MAX_TOKENS, reqs):
        ref = dec.generate(params, [p], n, list(EOS), 0, width=engine.bucket(len(p)),
                           cache_len=CACHE)
        assert (r.tokens, r.experts) == ref.row(0), (p, n)
        assert r.finish_reason == ("stop" if r.tokens[-1] in EOS else "length")
    # and the same tokens as one batch of every prompt (the decode CLI's shape)
    batch = dec.generate(params, PROMPTS, max(MAX_TOKENS), list(EOS), 0)
    for i, r in enumerate(reqs):
        assert batch.row(i)[0][:len(r.tokens)] == r.tokens


@pytest.mark.slow
def test_a_sampled_request_does_not_depend_on_its_neighbours(world):
    _, _, engine = _engine(world, slots=4, eos_ids=())
    mine = lambda: Request(PROMPTS[3], 10, temperature=0.9, top_k=20, top_p=0.95, seed=5)
    alone = engine.run([mine()])[0]
    crowd = [Request(p, 10, temperature=1.0, seed=i) for i, p in enumerate(PROMPTS[:5])]
    together = engine.run(crowd[:2] + [mine()] + crowd[2:])[2]
    assert together.tokens == alone.tokens and together.experts == alone.experts
    other_seed = engine.run([Request(PROMPTS[3], 10, temperature=0.9, top_k=20, top_p=0.95,
                                     seed=6)])[0]
    assert other_seed.tokens != alone.tokens  # the seed is what the draw depends on


@pytest.mark.slow
def test_cancel_frees_the_slot_and_a_request_that_cannot_fit_is_refused(world):
    dec, params, engine = _engine(world, slots=1, eos_ids=())
    assert engine.programs == len(BUCKETS) + 2
    long = engine.submit(Request(PROMPTS[0], 40))
    engine.step()
    assert engine.active == 1 and len(long.tokens) == 1 + dec.chunk
    nxt = engine.submit(Request(PROMPTS[1], 3))
    engine.cancel(long)
    assert long.finish_reason == "cancelled" and engine.active == 0
    while not engine.idle:
        engine.step()
    ref = dec.generate(params, [PROMPTS[1]], 3, [], 0, width=engine.bucket(len(PROMPTS[1])),
                       cache_len=CACHE)
    assert (nxt.tokens, nxt.experts) == ref.row(0)
    with pytest.raises(CacheOverflowError, match="longer than the longest prompt bucket"):
        engine.submit(Request(list(range(1, 18)), 4))
    with pytest.raises(CacheOverflowError, match="need 72 cache slots; the cache has 64"):
        engine.submit(Request(PROMPTS[0], 62))
    assert default_buckets(100) == (16, 32, 64, 100)


@pytest.mark.slow
def test_on_a_mesh_the_slots_are_sharded_and_the_tokens_unchanged(world):
    """8 CPU devices (data 2 x tensor 2 x expert 2): the params placed as the lineup places
    them, the slot rows split over `data`, each cache over its heads; every request's
    tokens and experts as on one device, ignore_eos included."""
    router, experts, params = world
    mesh = sh.make_mesh({"data": 2, "tensor": 2, "expert": -1})
    placed = {"router": jax.device_put(params["router"], sh.param_shardings(router, mesh)),
              "experts": jax.device_put(params["experts"], sh.param_shardings(experts, mesh))}
    dec = FusedDecoder(Mode.parse("fusionroute", N_EXPERTS), router, experts, chunk=4,
                       lazy_experts=True, catch_up_width=2, mesh=mesh)
    engine = Engine(dec, placed, slots=4, cache_len=CACHE, eos_ids=EOS, pad_id=0,
                    buckets=BUCKETS)
    assert engine.state.token.sharding.spec == sh.P("data")
    reqs = engine.run([Request(p, n, ignore_eos=i % 3 == 0)
                       for i, (p, n) in enumerate(zip(PROMPTS, MAX_TOKENS))])
    _, _, alone = _engine(world, slots=3)
    ref = alone.run([Request(p, n, ignore_eos=i % 3 == 0)
                     for i, (p, n) in enumerate(zip(PROMPTS, MAX_TOKENS))])
    assert [(r.tokens, r.experts) for r in reqs] == [(r.tokens, r.experts) for r in ref]
    assert all(len(r.tokens) == n and r.finish_reason == "length"
               for r, n in list(zip(reqs, MAX_TOKENS))[::3])  # ignore_eos: the whole budget


def test_per_row_sampling_is_each_rows_own_sample():
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(6, 50)) * 3, jnp.float32)
    settings = [(0.0, 0, 1.0), (0.8, 0, 1.0), (1.0, 5, 1.0), (1.2, 0, 0.7), (0.7, 10, 0.5),
                (1.0, 50, 0.99)]
    keys = jax.random.split(jax.random.key(3), len(settings))
    t, k, p = (jnp.asarray(c) for c in zip(*settings))
    got = sample_rows(logits, keys, t, k, p)
    for b, s in enumerate(settings):
        assert int(got[b]) == int(sample(logits[b:b + 1], keys[b], Sampling(*s))[0])


# ------------------------------------------------------------------ speculative decoding
@pytest.mark.slow
def test_the_speculative_engine_gives_plain_decodings_greedy_tokens(world):
    """decode.speculate = 3 behind the engine: more requests than slots, greedy, each with
    the tokens and experts plain decoding gives its prompt alone (ignore_eos rows run to
    their budget); every token but the first came from a pass (its kept drafts and one
    fused token), and a slot stops on the device at its max_tokens."""
    router, experts, params = world
    dec = SpeculativeDecoder(Mode.parse("fusionroute", N_EXPERTS), router, experts, 3,
                             chunk=2, lazy_experts=True, catch_up_width=2)
    engine = make_engine(dec, params, slots=3, cache_len=CACHE, eos_ids=EOS, pad_id=0,
                         buckets=BUCKETS)
    assert isinstance(engine, SpeculativeEngine)
    assert engine.room(16) == CACHE - 16 - 3
    ignore = lambda i: i % 4 == 1  # noqa: E731
    reqs = engine.run([Request(p, n, ignore_eos=ignore(i))
                       for i, (p, n) in enumerate(zip(PROMPTS, MAX_TOKENS))])
    assert engine.idle
    plain = FusedDecoder(Mode.parse("fusionroute", N_EXPERTS), router, experts, chunk=4,
                         lazy_experts=True, catch_up_width=2)
    for i, (p, n, r) in enumerate(zip(PROMPTS, MAX_TOKENS, reqs)):
        ref = plain.generate(params, [p], n, [] if ignore(i) else list(EOS), 0,
                             width=engine.bucket(len(p)), cache_len=CACHE)
        assert (r.tokens, r.experts) == ref.row(0), (p, n)
        assert r.spec_passes + r.spec_accepted == len(r.tokens) - 1, i
    assert sum(r.spec_accepted for r in reqs) > 0
    with pytest.raises(CacheOverflowError):
        engine.submit(Request(PROMPTS[2], engine.room(len(PROMPTS[2])) + 1))  # bucket 16


@pytest.mark.slow
def test_a_sampled_speculative_request_does_not_depend_on_its_neighbours(world):
    """Per-slot sampling inside the speculative rule: a request's draws depend on its own
    seed only; top_k = 1 leaves no randomness (greedy tokens)."""
    router, experts, params = world
    dec = SpeculativeDecoder(Mode.parse("fusionroute", N_EXPERTS), router, experts, 2,
                             chunk=2, lazy_experts=True, catch_up_width=2)
    engine = make_engine(dec, params, slots=4, cache_len=CACHE, eos_ids=(), pad_id=0,
                         buckets=BUCKETS)
    mine = lambda seed=5: Request(PROMPTS[3], 10, temperature=0.9, top_k=20,  # noqa: E731
                                  top_p=0.95, seed=seed)
    alone = engine.run([mine()])[0]
    crowd = [Request(p, 10, temperature=1.0, seed=i) for i, p in enumerate(PROMPTS[:4])]
    greedy = Request(PROMPTS[6], 10)
    one_hot = Request(PROMPTS[6], 10, temperature=0.8, top_k=1, seed=3)
    together = engine.run(crowd[:2] + [mine(), greedy, one_hot] + crowd[2:])
    assert (together[2].tokens, together[2].experts) == (alone.tokens, alone.experts)
    assert together[4].tokens == together[3].tokens
    assert engine.run([mine(6)])[0].tokens != alone.tokens
