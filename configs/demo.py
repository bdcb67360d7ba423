"""The embedded demo world, end to end: `python -m fr_jax.demo` (this file is its default).

    python -m fr_jax.demo                                  # the full run (docs/demo.md's table)
    python -m fr_jax.demo --config=configs/demo.py:quick   # the reduced run the tests use
                                                           # (from the bundled experts)
    python -m fr_jax.demo --config=configs/demo.py:smoke   # every step, a few updates each
                                                           # (CI's first phase; a minute or two)
    python -m fr_jax.demo --config.train.workdir=/tmp/demo --config.train.seed=1

Pipeline (fr_jax/toy/pipeline.py): world data -> a shared base model -> three domain experts
(written as HF folders, loaded back) -> router SFT -> CDPO on sampled preference pairs ->
the baselines (fine-tuned with the router's budget, merged, SharedTrunkNet sequence routing)
-> every decode mode on held-out prompts, plus the per-prompt oracle over the experts.

The config is the base config (fr_jax/config/base.py) with the demo's two sections added
(`world`, `demo`: fr_jax/config/demo_sections.py, where the world's sizes, the model shapes
and the base and expert budgets are declared); below, only what the demo sets differently.
The router's stages are fr_jax.train runs of this very config.
"""

from fr_jax.config import demo_config
from fr_jax.runtime.bundle import BUNDLE


def get_config(arg: str = ""):
    quick = arg == "quick"
    if arg not in ("", "full", "quick", "smoke"):
        raise ValueError(f"configs/demo.py takes '' (full), 'quick' or 'smoke', got {arg!r}")
    c = demo_config()
    c.train.workdir = "runs/demo-quick" if quick else "runs/demo"

    # The reduced run adopts the bundled world's base models and experts (trained by this
    # file's full run, same world) and trains everything from the router on; `''` trains
    # them too (test_pipeline_is_deterministic runs that path).
    c.demo.start_from = BUNDLE if quick else ""
    c.world.n_test = 100 if quick else 200
    c.world.n_labelled = 800 if quick else 1600

    # Every training run of the pipeline: tiny models, data parallel over whatever devices
    # there are; 64-token packed rows of 32.
    c.mesh.data, c.mesh.tensor = -1, 1
    c.data.seq_len = 64
    c.data.eval_fraction = 0.02
    c.train.batch_size = 32
    c.train.eval_batches = 2
    c.train.keep = 1

    # Router stage 1 (SFT) on world.router_mix, with the experts' signals computed once. The
    # fine-tuned baseline gets the same budget (steps x batch). Its generator term is half
    # the router's own LM, half the fused policy's (train.sft.lm_target=mix, lm_mix 0.5):
    # the ablation's pick, `mix` (docs/training.md).
    c.train.sft.steps = 600 if quick else 800
    c.train.sft.lm_target = "mix"
    c.train.sft.lm_mix = 0.5
    c.train.sft.lr = 3e-3
    c.train.sft.warmup = 20
    c.train.sft.expert_signals = "precompute"
    # Router stage 2 (CDPO, demo.cdpo_batch_size rows): pairs from sampled FusionRoute answers
    # of training prompts, a correct one (or the reference answer) against an incorrect one.
    c.train.cdpo.steps = 80 if quick else 150
    c.train.cdpo.lr = 2e-4
    c.train.cdpo.warmup = 10
    c.train.cdpo.beta = 0.5  # at 0.1 the policy drifts where the experts are already right
    # CDPO alone, the routing head frozen, fr_jax's routing-KL anchor on: stage 2 as the
    # ablation's pick (`mix`) ran it. The paper's guard (stage 1's loss kept on beside CDPO,
    # train.cdpo.sft_weight / head=sft) keeps the skills with room but averaged 2 points
    # less (`sft_mix_1`, docs/training.md).
    c.train.cdpo.sft_weight = 0.0
    c.train.cdpo.head = "frozen"
    c.train.cdpo.route_kl = 1.0
    c.pairs.sources.toy.limit = 800 if quick else 2400  # training prompts sampled for pairs
    c.pairs.batch_size = 256

    # Sequence-level routing on the router backbone's prefill activations (SharedTrunkNet):
    # world.n_labelled training prompts, every target's answers scored, probes, trunk.
    c.seqroute.max_new_tokens = 16
    c.seqroute.batch_size = 256
    c.seqroute.trunk.steps = 600 if quick else 1000
    c.seqroute.trunk.batch_size = 128

    # The evaluation: every decode mode on each domain's held-out prompts (eval.max_new_tokens
    # .toy tokens each), one column per domain.
    c.eval.modes = ("expert:0", "expert:1", "expert:2", "router_only", "expert_only",
                    "sequence:head", "sequence", "mixture", "merged:ta", "merged:ties",
                    "finetuned", "fusionroute")
    c.eval.batch_size = 256
    c.eval.columns = "groups"
    return _smoke(c) if arg == "smoke" else c


def _smoke(c):
    """Every step of the full run -- world, base models, experts, router SFT, pairs, CDPO,
    the baselines, the evaluation, the table -- with a few updates each: the whole pipeline
    runs, nothing in it learns. CI runs it in a runtime-only install."""
    c.train.workdir = "runs/demo-smoke"
    c.world.n_train, c.world.n_test, c.world.n_labelled = 200, 8, 32
    for stage in (c.demo.base, c.demo.router_base, c.demo.experts, c.train.sft):
        stage.steps, stage.warmup = 4, 1
    c.demo.experts.steps_by_domain.math = 4
    c.train.cdpo.steps, c.train.cdpo.warmup = 2, 1
    c.pairs.sources.toy.limit, c.pairs.samples = 16, 1
    c.seqroute.trunk.steps = 4
    # A decoder is compiled per mode: one expert alone, token routing, FusionRoute and each
    # baseline model's mode, each decoding path once.
    c.eval.modes = ("expert:0", "expert_only", "sequence", "merged:ties", "finetuned",
                    "fusionroute")
    return c
