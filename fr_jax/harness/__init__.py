"""The evaluation harness: decode modes over benchmarks' prompts, answers scored, tables.

benchmarks.py (the registry: GSM8K, MATH-500, MBPP, HumanEval, IFEval, the toy world) ->
prompts.py -> generation.py -> runner.py (cached generations, scores, the results) ->
scoring.py (standard scorers; code runs in sandbox/) -> report.py (tables, figure);
toy_world.py is the embedded world's tasks, tokenizer and scorer (the `toy` benchmark, and
the world the demo trains on). The command is `python -m fr_jax.eval` (fr_jax/eval.py).
"""
