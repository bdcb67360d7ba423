"""The embedded default: everything fr_jax needs to run with no checkpoints and no network."""
