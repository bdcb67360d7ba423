"""Sharded decode on a simulated 8-device CPU mesh equals single-device decode."""

import numpy as np

import jax
import pytest

from fr_jax.hf import save_hf
from fr_jax.inference import FusedDecoder
from fr_jax.routing.experts import load_experts
from fr_jax.routing.modes import Mode
from fr_jax.routing.router import load_router, save_router
from fr_jax.runtime import sharding as sh
from fixtures import PROMPTS, build_world


def _write(tmp_path):
    router, r_params, experts, e_list = build_world("llama", n_experts=4)
    save_router(str(tmp_path / "router"), router, r_params)
    paths = []
    for i, p in enumerate(e_list):
        paths.append(str(tmp_path / f"e{i}"))
        save_hf(paths[-1], experts.cfgs[0], p)
    return str(tmp_path / "router"), paths


def _decode(router_path, paths, mesh):
    shardings_fn = None if mesh is None else (lambda m: sh.param_shardings(m, mesh))
    router, r_params = load_router(router_path, shardings_fn=shardings_fn)
    experts, e_params = load_experts(paths, shardings_fn=shardings_fn)
    params = {"router": r_params, "experts": e_params}
    dec = FusedDecoder(Mode.parse("fusionroute"), router, experts, chunk=4, mesh=mesh)
    # Batch of 4 so the data axis (2) divides it.
    return dec.generate(params, PROMPTS + [[7, 8]], 9, eos_ids=[]), params


@pytest.mark.slow  # 20-30 s, compile-bound: the fast tier keeps under 6 min
def test_mesh_decode_equals_single_device(tmp_path):
    assert jax.device_count() == 8
    router_path, paths = _write(tmp_path)
    single, _ = _decode(router_path, paths, None)
    mesh = sh.make_mesh({"data": 2, "tensor": 2, "expert": -1})
    assert dict(mesh.shape) == {"data": 2, "fsdp": 1, "tensor": 2, "expert": 2}
    sharded, params = _decode(router_path, paths, mesh)
    np.testing.assert_array_equal(single.tokens, sharded.tokens)
    np.testing.assert_array_equal(single.chosen, sharded.chosen)
    # Sharded matmuls sum in another order: fp32 routing probabilities move by ~1e-5 (seen in
    # CI: 1.01e-5), while the tokens and the chosen experts must not move at all.
    np.testing.assert_allclose(single.route_probs, sharded.route_probs, atol=1e-4)

    # The params really are split: stacked experts over `expert`, heads over `tensor`.
    q = params["experts"]["layers"]["attn"]["q_proj"]["kernel"]  # [expert, layers, E, H, D]
    assert q.sharding.spec == sh.P("expert", None, None, "tensor", None)
    assert q.addressable_shards[0].data.shape == (q.shape[0] // 2, q.shape[1], q.shape[2], q.shape[3] // 2,
                                                  q.shape[4])
    # A dim the mesh does not divide is replicated: vocab 97 over tensor=2.
    emb = params["router"]["backbone"]["embed"]["embedding"]  # [vocab, embed]
    assert emb.shape[0] == 97 and emb.sharding.spec == sh.P(None, None)


@pytest.mark.slow
def test_mesh_decode_with_more_tensor_shards_than_kv_heads(tmp_path):
    """2 kv heads under 4-way tensor parallelism: the caches' rows go over `tensor`
    (sharding.FALLBACKS) and the queries follow them; the tokens do not change."""
    router_path, paths = _write(tmp_path)
    single, _ = _decode(router_path, paths, None)
    mesh = sh.make_mesh({"tensor": 4, "expert": -1})
    sharded, params = _decode(router_path, paths, mesh)
    np.testing.assert_array_equal(single.tokens, sharded.tokens)
    np.testing.assert_array_equal(single.chosen, sharded.chosen)
    # 4-way sharded head sums add in another order: probabilities move by up to ~2e-5.
    np.testing.assert_allclose(single.route_probs, sharded.route_probs, atol=1e-4)
    router, _ = load_router(router_path)
    cache = jax.eval_shape(lambda: router.init_cache(4, 16))
    assert router.cfg.num_kv_heads == 2 and router.cfg.num_heads == 4
    assert sh.cache_shardings(cache, mesh).k.spec == sh.P("tensor", None, None, None, None)


def test_rules_drop_axes_that_do_not_divide():
    mesh = sh.make_mesh({"data": 2, "tensor": 4})
    assert sh.spec_for(("batch", "vocab"), (6, 128), mesh) == sh.P("data", "tensor")
    assert sh.spec_for(("batch", "vocab"), (3, 130), mesh) == sh.P(None, None)
    assert sh.spec_for(("heads", "kv_heads"), (8, 8), mesh) == sh.P("tensor", None)
    # kv heads that the tensor axis does not divide hand it to the rows (a cache's layout)
    cache = ("batch", "layers", "kv_heads", "cache_slots", "head_dim")
    assert sh.spec_for(cache, (6, 2, 8, 16, 4), mesh) == sh.P("data", None, "tensor", None, None)
    assert sh.spec_for(cache, (8, 2, 3, 16, 4), mesh) == sh.P(("data", "tensor"), None, None,
                                                              None, None)
    assert sh.spec_for(cache, (6, 2, 3, 16, 4), mesh) == sh.P("data", None, None, None, None)
    assert sh.spec_for(cache, (3, 2, 3, 16, 4), mesh) == sh.P(None, None, None, None, None)
