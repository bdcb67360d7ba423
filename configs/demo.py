"""The embedded demo world, end to end: `python -m fr_jax.demo` (this file is its default).

    python -m fr_jax.demo                                  # the full run (docs/demo.md's table)
    python -m fr_jax.demo --config=configs/demo.py:quick   # the reduced run the tests use
                                                           # (from the bundled experts)
    python -m fr_jax.demo --config=configs/demo.py:smoke   # every step, a few updates each
                                                           # (CI's first phase; a minute or two)
    python -m fr_jax.demo --config.workdir=/tmp/demo --config.seed=1

Pipeline (fr_jax/toy/pipeline.py): world data -> a shared base model -> three domain experts
(written as HF folders, loaded back) -> router SFT -> CDPO on sampled preference pairs ->
the baselines (fine-tuned with the router's budget, merged, SharedTrunkNet sequence routing)
-> every decode mode on held-out prompts, plus the per-prompt oracle over the experts.
"""

import ml_collections

from fr_jax.runtime.bundle import BUNDLE
from fr_jax.config import base_config


def _model(hidden, layers, ff, heads, kv_heads):
    m = ml_collections.ConfigDict()
    m.hidden_size = hidden  # model width
    m.num_layers = layers  # transformer blocks
    m.intermediate_size = ff  # MLP width
    m.num_heads = heads  # attention heads
    m.num_kv_heads = kv_heads  # key / value heads (grouped-query attention)
    return m


def _stage(steps, lr, warmup, batch):
    s = ml_collections.ConfigDict()
    s.steps = steps  # optimizer updates
    s.lr = lr  # peak learning rate (linear warmup, then cosine decay)
    s.warmup = warmup  # warmup steps
    s.batch_size = batch  # rows per update
    return s


def get_config(arg: str = ""):
    quick = arg == "quick"
    if arg not in ("", "full", "quick", "smoke"):
        raise ValueError(f"configs/demo.py takes '' (full), 'quick' or 'smoke', got {arg!r}")
    c = ml_collections.ConfigDict()
    c.workdir = "runs/demo-quick" if quick else "runs/demo"
    c.seed = 0
    c.progress = True
    c.bundle = ""  # a folder: also write the trained router + experts there (the package's)

    # The reduced run adopts the bundled world's base models and experts (trained by this
    # file's full run, same world) and trains everything from the router on; `''` trains
    # them too (test_pipeline_is_deterministic runs that path).
    c.start_from = BUNDLE if quick else ""

    c.world = ml_collections.ConfigDict()
    c.world.seed = 0  # the tasks: held-out prompts and training pools (`seed`: the training)
    c.world.n_train = 3000  # distinct training tasks per domain
    c.world.n_test = 100 if quick else 200  # held-out prompts per domain
    c.world.seq_len = 64  # packed training rows

    # Experts: Llama-3 architecture, one shared base fine-tuned per domain. Router: smaller.
    # 3 x 80 is the ablation's pick (docs/training.md): the highest FusionRoute average among
    # the variants within a point of expert_only on every skill domain (3 seeds, reduced
    # world; on the full world it loses 1.5 +- 1.3 on math, docs/training.md says so).
    c.expert_model = _model(96, 3, 256, 4, 2)
    c.router_model = _model(80, 3, 224, 4, 2)

    # Base ("pretraining"): the general task `say` (repeat a string) -- the format and
    # copying, no domain skill. Experts: from the base, on their own domain (`own` share of
    # their data, the rest the other skill domains).
    # Small transformers learn to copy, and to add, in a sudden phase change whose timing
    # varies with the seed: at 300 base steps one seed's router base had not learnt to copy
    # (loss 0.74 against 0.02); at 450-600 steps the math expert reached 14-58%, and at 300
    # steps one seed's code expert 43%. The
    # budgets below leave room for the late seeds; the quick run keeps them (weak experts
    # show nothing) and saves time on the router side instead.
    c.base = _stage(600, 3e-3, 30, 32)
    c.base.mix = ml_collections.ConfigDict({"say": 1.0})
    c.router_base = _stage(600, 3e-3, 30, 32)  # the router's, same data
    c.experts = _stage(600, 3e-3, 20, 32)
    c.experts.own = 1.0
    # Domains differ in difficulty: addition takes the most steps to learn.
    c.experts.steps_by_domain = ml_collections.ConfigDict({"math": 1000})
    # Router stage 1 (SFT) on the mixed-domain data (the skill domains and `mixed`).
    c.sft = _stage(600 if quick else 800, 3e-3, 20, 32)
    c.sft.mix = ml_collections.ConfigDict({"math": 1.0, "code": 1.0, "instr": 1.0, "mixed": 1.0})
    c.sft.lm_weight = 1.0
    c.sft.routing_loss = "mixture"
    # The generator term (docs/training.md): the router's own LM (`router`), the fused
    # policy (`fused`, on `lm_positions` all | informative) or a mix (`lm_mix` fused).
    c.sft.lm_target = "router"
    c.sft.lm_positions = "all"
    c.sft.lm_mix = 0.5
    # Router stage 2 (CDPO): pairs from sampled FusionRoute answers of training prompts,
    # a correct one (or the reference answer) against an incorrect one.
    c.cdpo = _stage(80 if quick else 150, 2e-4, 10, 16)
    c.cdpo.beta = 0.5  # at 0.1 the policy drifts where the experts are already right
    c.cdpo.route_kl = 1.0
    c.cdpo.chosen_nll = 0.0
    c.cdpo.prompts = 800 if quick else 2400  # training prompts sampled for pairs
    c.cdpo.samples = 4  # sampled answers per prompt (plus the greedy one)
    c.cdpo.temperature = 1.0  # of the sampled answers
    # The chosen answer of a pair: a correct sampled FusionRoute answer where there is one,
    # else the reference (`sampled`); or always the reference answer (`reference`).
    c.cdpo.chosen = "sampled"
    # The fine-tuned baseline: the experts' base, fine-tuned on the router's SFT data with
    # the router's SFT budget (steps x batch).

    # Merging baselines over the experts and their shared base (fr_jax.baselines.merging).
    c.merge = ml_collections.ConfigDict()
    c.merge.ta_lambda = 0.5  # task arithmetic: base + 0.5 * sum of task vectors
    c.merge.ties_density = 0.2  # TIES: keep the top 20% of each task vector
    c.merge.ties_lambda = 1.0

    # Sequence-level routing on the router backbone's prefill activations (SharedTrunkNet):
    # labelled training prompts, every target's answers scored, probes, trunk.
    c.seqroute = base_config().seqroute
    c.seqroute.n_labelled = 800 if quick else 1600  # training tasks over the four domains
    c.seqroute.max_new_tokens = 16
    c.seqroute.batch_size = 256
    c.seqroute.lam = 0.0  # the table's row: the most accurate choice, whatever it costs
    c.seqroute.trunk.steps = 600 if quick else 1000
    c.seqroute.trunk.batch_size = 128

    # False: the router's side only (no fine-tuned, merged or SharedTrunkNet baselines; the
    # ablation runner's runs), evaluated on the eval.modes that need none of them.
    c.baselines = True

    c.eval = ml_collections.ConfigDict()
    c.eval.modes = ("expert:0", "expert:1", "expert:2", "router_only", "expert_only",
                    "sequence:head", "sequence", "mixture", "merged:ta", "merged:ties",
                    "finetuned", "fusionroute")
    c.eval.max_new_tokens = 16
    c.eval.batch_size = 256
    return _smoke(c) if arg == "smoke" else c


def _smoke(c):
    """Every step of the full run -- world, base models, experts, router SFT, pairs, CDPO,
    the baselines, the evaluation, the table -- with a few updates each: the whole pipeline
    runs, nothing in it learns. CI runs it in a runtime-only install."""
    c.workdir = "runs/demo-smoke"
    c.world.n_train, c.world.n_test = 200, 8
    for stage in (c.base, c.router_base, c.experts, c.sft):
        stage.steps, stage.warmup = 4, 1
    c.experts.steps_by_domain.math = 4
    c.cdpo.steps, c.cdpo.warmup, c.cdpo.prompts, c.cdpo.samples = 2, 1, 16, 1
    c.seqroute.n_labelled, c.seqroute.trunk.steps = 32, 4
    # A decoder is compiled per mode: one expert alone, token routing, FusionRoute and each
    # baseline model's mode, each decoding path once.
    c.eval.modes = ("expert:0", "expert_only", "sequence", "merged:ties", "finetuned",
                    "fusionroute")
    return c
