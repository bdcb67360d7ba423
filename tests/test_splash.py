"""The fused TPU attention kernel (fr_jax.models.splash, run here in the Pallas
interpreter) against the einsum attention it replaces: logits at every real position and
gradients of a masked loss, on packed rows with padding, for Llama-3 (GQA) and Gemma-2
(attention soft-cap, a sliding window shorter than the rows), on one device and sharded
over an 8-device mesh."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from fr_jax.corpus import Batcher, SFTExample
from fr_jax.models import Model
from fr_jax.models.splash import use_splash
from fr_jax.runtime import sharding as sh
from fixtures import scaled_params as _scaled_params, tiny

SEQ = 128


def _rows(seed=0, rows=4):
    rng = np.random.default_rng(seed)
    examples = [SFTExample(rng.integers(3, 97, n).astype(np.int32),
                           np.r_[np.zeros(3), np.ones(n - 3)].astype(np.int32))
                for n in rng.integers(20, 60, 3 * rows)]
    return Batcher(examples, rows, SEQ, seed=0).next()


def _loss(model, params, batch):
    out = model.forward(params, batch["tokens"], batch["positions"], batch["segment_ids"])
    lsm = jax.nn.log_softmax(out.logits, axis=-1)
    lp = jnp.take_along_axis(lsm, batch["targets"][..., None], axis=-1)[..., 0]
    return -(lp * batch["loss_mask"]).sum() / batch["loss_mask"].sum(), out.logits


# (The Pallas interpreter takes ~15 s a case: one family per placement.)
@pytest.mark.parametrize("model_type,mesh_shape", [("llama", None),
                                                   ("gemma2", {"fsdp": 4, "tensor": 2})])
def test_splash_equals_einsum_attention(model_type, mesh_shape):
    cfg = tiny(model_type)
    xla, fused = Model(cfg), Model(cfg.replace(attention="splash"))
    params = _scaled_params(xla, seed=1)
    batch = {k: jnp.asarray(v) for k, v in _rows().items()}
    assert (batch["positions"] < 0).any() and (batch["segment_ids"] > 1).any()
    mesh = sh.make_mesh(mesh_shape) if mesh_shape else None

    def run(model):
        fn = jax.value_and_grad(lambda p, b: _loss(model, p, b), has_aux=True)
        if mesh is None:
            return jax.jit(fn)(params, batch)
        # as training places them: params by the rules table, rows over the batch axes
        p_sh = sh.shardings_for(model.logical_axes(), params, mesh)
        b_sh = {k: sh.batch_sharding(mesh, v.shape) for k, v in batch.items()}
        return jax.jit(sh.traced_on(fn, mesh), in_shardings=(p_sh, b_sh))(params, batch)

    (loss_x, logits_x), grads_x = run(xla)
    (loss_f, logits_f), grads_f = run(fused)
    real = np.asarray(batch["positions"] >= 0)
    np.testing.assert_allclose(np.asarray(logits_f)[real], np.asarray(logits_x)[real],
                               rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(loss_f, loss_x, rtol=1e-6)
    for (path, gx), gf in zip(jax.tree_util.tree_leaves_with_path(grads_x),
                              jax.tree.leaves(grads_f)):
        scale = float(jnp.abs(gx).max()) + 1e-12
        np.testing.assert_allclose(np.asarray(gf) / scale, np.asarray(gx) / scale, atol=1e-4,
                                   err_msg=jax.tree_util.keystr(path))


def test_auto_attention_picks_the_kernel_for_tpu_only():
    assert use_splash("splash", 256) and not use_splash("xla", 2048)
    assert not use_splash("splash", 200)  # not a multiple of the kernel's 128-token tiles
    # Here (CPU) "auto" keeps the einsum path; a TPU mesh (fr_jax.plan's compiles) selects
    # the kernel at multiples of 128 tokens only.
    assert not use_splash("auto", 2048)
