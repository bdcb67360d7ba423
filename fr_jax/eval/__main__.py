from fr_jax.eval.cli import main

main()
