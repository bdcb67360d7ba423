"""FusionRoute on the Gemma-2 family: Gemma-2-2B-it router, Gemma-2-9B experts.

    python -m fr_jax.train --config=configs/gemma2.py \
        --config.router.path=/ckpt/gemma-2-2b-it \
        --config.experts.paths="('/ckpt/gemma2-9b-math', '/ckpt/gemma2-9b-code', '/ckpt/gemma2-9b-if')"

Paths are local folders (nothing is downloaded); every field can be overridden. Shared
settings (mesh, dtypes, data shapes, schedules) live in `fr_jax.config.real_family_config`.
"""

from fr_jax.config import real_family_config


def get_config():
    c = real_family_config(workdir="runs/gemma2")
    c.router.path = "/ckpt/gemma-2-2b-it"  # base checkpoint: a fresh routing head
    c.experts.paths = ("/ckpt/gemma2-9b-math", "/ckpt/gemma2-9b-code", "/ckpt/gemma2-9b-if")
    c.experts.names = ("math", "code", "instr")
    c.decode.eos_ids = (1, 107)  # <eos>, <end_of_turn>
    c.plan.router_arch, c.plan.expert_arch = "gemma-2-2b", "gemma-2-9b"
    # `python -m fr_jax.plan` (docs/planning.md): v5e-8 cannot hold the CDPO step
    # (26.7 GiB per chip) nor decoding at batch 32 (the lineup's weights and 2048-slot
    # caches alone are 16 GiB per chip). v5p-8 (4 chips) fits every program, as does v4-16
    # (8 chips); v5p-8 is the smaller slice.
    c.plan.topology = "v5p-8"
    return c
