"""The data engine: the files a router trains on, made from sources and from a stage-1 router.

    mixture.py     a recipe -> the stage-1 SFT mixture (dedup, decontamination against the
                   benchmarks' test sets)
    preference.py  the stage-1 router's scored sampled answers -> CDPO pairs

It uses the evaluation harness (benchmarks, scorers, sandbox) and the lineup; its commands
are `python -m fr_jax.data.sft` and `python -m fr_jax.data.pairs`.
"""
