"""fr_jax: FusionRoute (token-level multi-LLM collaboration) in JAX/Flax."""

__version__ = "0.1.0"
