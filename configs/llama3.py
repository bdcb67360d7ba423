"""FusionRoute on the Llama-3 family: Llama-3.2-1B-Instruct router, Llama-3.1-8B experts.

    python -m fr_jax.train --config=configs/llama3.py \
        --config.router.path=/ckpt/Llama-3.2-1B-Instruct \
        --config.experts.paths="('/ckpt/llama31-8b-math', '/ckpt/llama31-8b-code', '/ckpt/llama31-8b-if')"

Paths are local folders (nothing is downloaded); every field can be overridden. Shared
settings (mesh, dtypes, data shapes, schedules) live in `fr_jax.config.real_family_config`.
"""

from fr_jax.config import real_family_config


def get_config():
    c = real_family_config(workdir="runs/llama3")
    c.router.path = "/ckpt/Llama-3.2-1B-Instruct"  # base checkpoint: a fresh routing head
    c.experts.paths = ("/ckpt/llama31-8b-math", "/ckpt/llama31-8b-code", "/ckpt/llama31-8b-if")
    c.experts.names = ("math", "code", "instr")
    c.decode.eos_ids = (128001, 128009)  # <|end_of_text|>, <|eot_id|>
    c.plan.router_arch, c.plan.expert_arch = "llama-3.2-1b", "llama-3.1-8b"
    return c
