"""Decoder-only models (Llama-3 family, Gemma-2 family) as pure Flax modules."""

from fr_jax.models.architecture import ConfigError, ModelConfig, RopeConfig
from fr_jax.models.cache import KVCache, init_cache
from fr_jax.models.model import CacheOverflowError, Model, check_capacity
from fr_jax.models.transformer import Transformer, TransformerOutput

__all__ = ["CacheOverflowError", "ConfigError", "KVCache", "Model", "ModelConfig",
           "RopeConfig", "Transformer", "TransformerOutput", "check_capacity", "init_cache"]
