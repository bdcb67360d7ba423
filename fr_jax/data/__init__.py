"""The data commands: `python -m fr_jax.data.sft` (the stage-1 SFT mixture from a recipe)
and `python -m fr_jax.data.pairs` (CDPO pairs from the stage-1 router). Their library is
fr_jax.datagen; records, tokenizing and batching are fr_jax.corpus."""
