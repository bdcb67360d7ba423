"""`python -m fr_jax.eval`: see fr_jax/evaluate.py."""

from fr_jax.evaluate import main

main()
