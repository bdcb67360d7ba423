"""FusionRoute on the Gemma-2 family: Gemma-2-2B-it router, Gemma-2-9B experts.

    python -m fr_jax.train --config=configs/gemma2.py \
        --config.router.path=/ckpt/gemma-2-2b-it \
        --config.experts.paths="('/ckpt/gemma2-9b-math', '/ckpt/gemma2-9b-code', '/ckpt/gemma2-9b-if')"

Paths are local folders (nothing is downloaded); every field can be overridden.
"""

from fr_jax.config import base_config


def get_config():
    c = base_config()
    c.router.path = "/ckpt/gemma-2-2b-it"
    c.experts.paths = ("/ckpt/gemma2-9b-math", "/ckpt/gemma2-9b-code", "/ckpt/gemma2-9b-if")
    c.experts.names = ("math", "code", "instr")
    c.model.dtype = "bfloat16"
    c.model.param_dtype = "float32"

    c.mesh.data = 1
    c.mesh.fsdp = 4
    c.mesh.tensor = 2
    c.mesh.expert = 1

    c.data.sft_path = "/data/fusionroute/sft_mixed.jsonl"
    c.data.pref_path = "/data/fusionroute/pref.jsonl"
    c.data.seq_len = 2048
    c.data.chat = True

    c.decode.eos_ids = (1, 107)  # <eos>, <end_of_turn>
    c.train.workdir = "runs/gemma2"
    c.train.batch_size = 32
    c.train.grad_accum = 4
    c.train.log_every = 10
    c.train.eval_every = 200
    c.train.sample_every = 500
    c.train.ckpt_every = 500
    c.train.sft.steps = 3000
    c.train.sft.lr = 1e-5
    c.train.sft.warmup = 100
    c.train.sft.expert_signals = "precompute"
    c.train.cdpo.steps = 500
    c.train.cdpo.lr = 5e-7
    c.train.cdpo.beta = 0.1
    return c
