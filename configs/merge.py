"""`python -m fr_jax.merge`: merge experts fine-tuned from one base into a single HF model.

    python -m fr_jax.merge                                       # the bundled toy world's experts
    python -m fr_jax.merge --base=/ckpt/llama3-base --experts=/ckpt/math,/ckpt/code \
        --method=ties --config.density=0.2 --out=/ckpt/merged-ties

Methods (fr_jax/baselines/merging.py): linear, task_arithmetic, ties, dare.
"""

import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.base = ""  # the experts' shared base (HF folder); "" + no experts = the bundled world
    c.experts = ()  # expert HF folders
    c.method = "ties"  # linear | task_arithmetic | ties | dare
    c.weights = ()  # linear: one weight per expert (normalised); () = the mean
    c.lambdas = ()  # task_arithmetic / dare: one scale per expert; () = `lam` for every one
    c.lam = 1.0  # TIES: scale of the merged task vector; task arithmetic: default lambda
    c.density = 0.2  # TIES (and DARE + TIES): share of each task vector kept
    c.drop = 0.9  # DARE: probability of dropping an entry
    c.seed = 0  # DARE's masks
    c.combine = "task_arithmetic"  # DARE: then task_arithmetic or ties
    c.out = "runs/merged"
    c.dtype = ""  # storage dtype of the output ("" = the base's)
    return c
