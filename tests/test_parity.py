"""Numerical parity with transformers' PyTorch models (eager attention, fp32, raw logits).

Weights travel the real import path: save_pretrained(safe_serialization=True) -> load_hf.
"""

import numpy as np
import pytest

import jax.numpy as jnp

from fr_jax.hf import load_hf
from fr_jax.models import Model
from tiny_models import VOCAB, build, gemma2_config, llama_config, torch_logits

TOL = 1e-4
CASES = {
    # name: (config factory, sequence length); 320 tokens > 5x the original rope context.
    "llama3_rope_scaling": (lambda: llama_config(rope_scaling=True), 320),
    "llama32_tied": (lambda: llama_config(tied=True), 96),
    "gemma2": (lambda: gemma2_config(), 48),
}


def _tokens(batch, length, seed=0):
    return np.random.default_rng(seed).integers(0, VOCAB, (batch, length))


def _saved(tmp_path, name, shard=False, std=0.15):
    torch_model = build(CASES[name][0](), std=std)
    kw = {"max_shard_size": "40KB"} if shard else {}
    torch_model.save_pretrained(tmp_path, safe_serialization=True, **kw)
    return torch_model


@pytest.mark.parametrize("name", sorted(CASES))
def test_logits_match_transformers(tmp_path, name):
    torch_model = _saved(tmp_path, name)
    cfg, params = load_hf(str(tmp_path))
    tokens = _tokens(2, CASES[name][1])
    ref = torch_logits(torch_model, tokens)
    ours = np.asarray(Model(cfg).forward(params, jnp.asarray(tokens)).logits)
    assert ours.dtype == np.float32
    diff = np.abs(ours - ref).max()
    print(f"parity {name}: max|diff| = {diff:.2e} (logit std {ref.std():.2f})")
    assert diff <= TOL


@pytest.mark.parametrize("name", ["llama3_rope_scaling", "gemma2"])
def test_sharded_checkpoint_loads(tmp_path, name):
    torch_model = _saved(tmp_path, name, shard=True)
    shards = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "model.safetensors.index.json").exists()
    cfg, params = load_hf(str(tmp_path))
    tokens = _tokens(1, 40)
    diff = np.abs(np.asarray(Model(cfg).forward(params, jnp.asarray(tokens)).logits)
                  - torch_logits(torch_model, tokens)).max()
    assert diff <= TOL


# Each feature must change the logits far beyond the tolerance: otherwise the parity test
# above would pass even with the feature implemented wrong.
FEATURES = {
    "llama3_rope_scaling": {"rope": lambda c: c.rope.__class__(theta=c.rope.theta)},
    "gemma2": {
        "attn_logit_softcap": lambda c: None,
        "final_logit_softcap": lambda c: None,
        "sliding_window": lambda c: ("full_attention",) * c.num_layers,
        "query_pre_attn_scalar": lambda c: float(c.head_dim),
        "norm_plus_one": lambda c: False,
        "scale_embeddings": lambda c: False,
    },
}


@pytest.mark.parametrize("name,feature", [(n, f) for n, fs in FEATURES.items() for f in fs])
def test_every_feature_changes_the_output(tmp_path, name, feature):
    _saved(tmp_path, name)
    cfg, params = load_hf(str(tmp_path))
    tokens = jnp.asarray(_tokens(1, CASES[name][1]))
    base = np.asarray(Model(cfg).forward(params, tokens).logits)
    off = FEATURES[name][feature](cfg)
    field = "layer_types" if feature == "sliding_window" else feature
    changed = np.asarray(Model(cfg.replace(**{field: off})).forward(params, tokens).logits)
    assert np.abs(base - changed).max() > 100 * TOL, f"{feature} does not affect the logits"
