"""HF folder import/export: round trips through transformers, and clear errors."""

import json
import os

import numpy as np
import pytest
import torch

import jax
import jax.numpy as jnp
from transformers import AutoModelForCausalLM

from fr_jax.hf import load_config, load_hf, save_hf
from fr_jax.models import ConfigError, Model, ModelConfig
from fr_jax.runtime.errors import CheckpointError
from tiny_models import build, gemma2_config, llama_config, torch_logits

TOL = 1e-4


def _random_params(cfg, seed=0):
    params = Model(cfg).init(jax.random.key(seed))
    return jax.tree.map(lambda x: x * 5.0 if x.ndim > 1 else x + 0.1, params)


@pytest.mark.parametrize("factory", [llama_config, lambda: llama_config(tied=True), gemma2_config],
                         ids=["llama", "llama_tied", "gemma2"])
@pytest.mark.parametrize("shards", [1, 3])
def test_export_loads_in_transformers_with_same_logits(tmp_path, factory, shards):
    cfg = ModelConfig.from_hf(factory().to_dict())
    params = _random_params(cfg)
    total = sum(x.nbytes for x in jax.tree.leaves(params))
    save_hf(str(tmp_path), cfg, params, max_shard_bytes=total // shards + 1)
    n_files = len(list(tmp_path.glob("*.safetensors")))
    assert (n_files > 1) == (shards > 1)
    assert (tmp_path / "model.safetensors.index.json").exists() == (shards > 1)
    torch_model = AutoModelForCausalLM.from_pretrained(str(tmp_path), attn_implementation="eager",
                                                       dtype=torch.float32)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 40))
    ours = np.asarray(Model(cfg).forward(params, jnp.asarray(tokens)).logits)
    assert np.abs(torch_logits(torch_model, tokens) - ours).max() <= TOL
    # ... and back into fr_jax unchanged.
    cfg2, params2 = load_hf(str(tmp_path))
    assert cfg2 == cfg
    jax.tree.map(np.testing.assert_array_equal, params, params2)


def test_bf16_export_and_load(tmp_path):
    cfg = ModelConfig.from_hf(llama_config().to_dict())
    params = _random_params(cfg)
    save_hf(str(tmp_path), cfg, params, dtype="bfloat16")
    cfg_bf16, params_bf16 = load_hf(str(tmp_path), dtype="bfloat16")
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params_bf16))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (1, 24)))
    out = Model(cfg_bf16).forward(params_bf16, tokens)
    assert out.logits.dtype == jnp.float32  # logits always fp32
    ref = Model(cfg).forward(params, tokens).logits
    # bf16 weights and activations: same model up to bf16 rounding.
    assert np.corrcoef(np.ravel(out.logits), np.ravel(ref))[0, 1] > 0.99


# ------------------------------------------------------------------ config.json spellings
def test_transformers_4x_and_5x_rope_spellings_agree():
    v5 = llama_config().to_dict()
    v4 = dict(v5)
    rope = dict(v4.pop("rope_parameters"))
    v4["rope_theta"] = rope.pop("rope_theta")
    v4["rope_scaling"] = {"type": rope.pop("rope_type"), **rope}
    a, b = ModelConfig.from_hf(v5), ModelConfig.from_hf(v4)
    assert a == b and a.rope.rope_type == "llama3" and a.rope.factor == 8.0


def test_gemma2_defaults_alternate_sliding_layers_starting_with_layer0():
    raw = gemma2_config(num_hidden_layers=4).to_dict()
    raw.pop("layer_types")
    cfg = ModelConfig.from_hf(raw)
    assert cfg.layer_types == ("sliding_attention", "full_attention") * 2
    assert cfg.query_pre_attn_scalar == 24 and cfg.tie_word_embeddings


# ------------------------------------------------------------------ clear errors
def _save_torch(tmp_path, **kw):
    build(llama_config(), std=0.1).save_pretrained(str(tmp_path), safe_serialization=True, **kw)


def _edit_config(folder, **changes):
    raw = json.loads((folder / "config.json").read_text())
    raw.update(changes)
    (folder / "config.json").write_text(json.dumps(raw))


def test_missing_folder_and_missing_config(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_hf(str(tmp_path / "nope"))
    _save_torch(tmp_path)
    os.remove(tmp_path / "config.json")
    with pytest.raises(CheckpointError, match="config.json not found"):
        load_hf(str(tmp_path))


def test_unknown_model_type(tmp_path):
    _save_torch(tmp_path)
    _edit_config(tmp_path, model_type="mistral")
    with pytest.raises(ConfigError, match="unsupported model_type 'mistral'.*llama, gemma2"):
        load_config(str(tmp_path))


def test_truncated_shard_names_file_and_tensor(tmp_path):
    _save_torch(tmp_path, max_shard_size="40KB")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[-1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match=rf"{shard.name} is truncated: tensor '.+'"):
        load_hf(str(tmp_path))


def test_shape_mismatch_names_tensor(tmp_path):
    _save_torch(tmp_path)
    _edit_config(tmp_path, intermediate_size=96)
    with pytest.raises(CheckpointError, match=r"'model.layers.0.mlp.gate_proj.weight'.*\(128, 64\)"
                                              r".*\(96, 64\)"):
        load_hf(str(tmp_path))


def test_missing_tensor_and_pickle_only_folder(tmp_path):
    _save_torch(tmp_path)
    _edit_config(tmp_path, num_hidden_layers=3)
    with pytest.raises(CheckpointError, match="no tensor 'model.layers.2"):
        load_hf(str(tmp_path))
    os.remove(tmp_path / "model.safetensors")
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="pytorch_model.bin.*safe_serialization"):
        load_hf(str(tmp_path))


def test_load_onto_a_mesh_places_each_shard(tmp_path):
    """With shardings, params are assembled shard by shard on an 8-device (CPU) mesh."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    assert jax.device_count() == 8, "tests/conftest.py should simulate 8 CPU devices"
    _save_torch(tmp_path)
    cfg = load_config(str(tmp_path))
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("fsdp", "tensor"))
    shapes = Model(cfg).param_shapes()

    def spec(x):  # shard the first axis over fsdp and the last over tensor where they divide
        axes = [None] * x.ndim
        if x.ndim >= 2 and x.shape[0] % 4 == 0:
            axes[0] = "fsdp"
        if x.ndim >= 2 and x.shape[-1] % 2 == 0:
            axes[-1] = "tensor"
        return NamedSharding(mesh, P(*axes))

    shardings = jax.tree.map(spec, shapes)
    _, placed = load_hf(str(tmp_path), shardings=shardings)
    _, plain = load_hf(str(tmp_path))
    emb = placed["embed"]["embedding"]
    assert emb.sharding == shardings["embed"]["embedding"]
    assert emb.addressable_shards[0].data.shape == (emb.shape[0] // 4, emb.shape[1] // 2)
    jax.tree.map(np.testing.assert_array_equal, placed, plain)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 16)))
    np.testing.assert_allclose(Model(cfg).forward(placed, tokens).logits,
                               Model(cfg).forward(plain, tokens).logits, atol=1e-5)
