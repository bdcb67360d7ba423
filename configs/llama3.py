"""FusionRoute on the Llama-3 family: Llama-3.2-1B-Instruct router, Llama-3.1-8B experts.

    python -m fr_jax.train --config=configs/llama3.py \
        --config.router.path=/ckpt/Llama-3.2-1B-Instruct \
        --config.experts.paths="('/ckpt/llama31-8b-math', '/ckpt/llama31-8b-code', '/ckpt/llama31-8b-if')"

Paths are local folders (nothing is downloaded); every field can be overridden.
"""

from fr_jax.config import base_config


def get_config():
    c = base_config()
    c.router.path = "/ckpt/Llama-3.2-1B-Instruct"  # base checkpoint: a fresh routing head
    c.experts.paths = ("/ckpt/llama31-8b-math", "/ckpt/llama31-8b-code", "/ckpt/llama31-8b-if")
    c.experts.names = ("math", "code", "instr")
    c.model.dtype = "bfloat16"
    c.model.param_dtype = "float32"  # master weights; activations in bf16

    # One host of 8 accelerators: FSDP over 4, tensor parallel over 2; on a pod, raise data.
    c.mesh.data = 1
    c.mesh.fsdp = 4
    c.mesh.tensor = 2
    c.mesh.expert = 1

    c.data.sft_path = "/data/fusionroute/sft_mixed.jsonl"
    c.data.pref_path = "/data/fusionroute/pref.jsonl"
    c.data.seq_len = 2048
    c.data.chat = True

    c.decode.eos_ids = (128001, 128009)  # <|end_of_text|>, <|eot_id|>
    c.train.workdir = "runs/llama3"
    c.train.batch_size = 32
    c.train.grad_accum = 4
    c.train.log_every = 10
    c.train.eval_every = 200
    c.train.sample_every = 500
    c.train.ckpt_every = 500
    c.train.sft.steps = 3000
    c.train.sft.lr = 1e-5
    c.train.sft.warmup = 100
    c.train.sft.expert_signals = "precompute"  # the experts run once, not every epoch
    c.train.cdpo.steps = 500
    c.train.cdpo.lr = 5e-7
    c.train.cdpo.beta = 0.1
    return c
