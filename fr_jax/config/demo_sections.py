"""The demo world's own settings: the two sections `python -m fr_jax.demo` adds to the base
config (configs/demo.py is `demo_config()` with overrides).

Everything the demo shares with the product is the base config's field, set where a
user of fr_jax.train would set it: the router's two stages (train.sft.*, train.cdpo.*,
train.batch_size), its data rows (data.seq_len), the preference pairs (pairs.*), the
sequence-level baseline (seqroute.*) and the evaluation (eval.*). `train.workdir` is the
demo's folder and `train.seed` the seed of every step of its run. What only a pipeline
that also builds its world, its bases and its experts has lives here: `world` (the tasks
and the data mixtures) and `demo` (model shapes, the budgets of the stages fr_jax.train
runs as stage `lm`, the merges, where to start from and what to bundle).
"""

from __future__ import annotations

import ml_collections

from fr_jax.config.base import base_config
from fr_jax.config.settings import Section, Setting as S, build, docs, section


def _world() -> Section:
    return section(
        ("The demo world's tasks (fr_jax.harness.toy_world) and the data each training run "
         "reads, drawn with train.seed."),
        seed=S(0, "the tasks: held-out prompts and training pools (train.seed: the training)",
               lo=0),
        n_train=S(3000, "distinct training tasks per domain", lo=1),
        n_test=S(200, "held-out prompts per domain", lo=1),
        n_labelled=S(1600, "labelled training prompts of the sequence-level baseline", lo=1),
        base_mix=S({"say": 1.0},
            "the bases' pretraining data: {domain: weight} over say, math, code, instr, mixed",
            lo=0),
        router_mix=S({"math": 1.0, "code": 1.0, "instr": 1.0, "mixed": 1.0},
            ("the router's SFT data (and the fine-tuned baseline's): {domain: weight} over "
             "say, math, code, instr, mixed"), lo=0),
        expert_own=S(1.0,
            "an expert's share of its own domain in its data; the rest: the other skill domains",
            lo=0, hi=1),
    )


def _model(hidden: int, layers: int, ff: int, heads: int, kv_heads: int, doc: str) -> Section:
    return section(
        doc,
        hidden_size=S(hidden, "model width", lo=1),
        num_layers=S(layers, "transformer blocks", lo=1),
        intermediate_size=S(ff, "MLP width", lo=1),
        num_heads=S(heads, "attention heads", lo=1),
        num_kv_heads=S(kv_heads, "key / value heads (grouped-query attention)", lo=1),
    )


def _lm_stage(steps: int, warmup: int, doc: str, **extra) -> Section:
    return section(
        doc,
        steps=S(steps, "optimizer updates (of train.batch_size rows)", lo=1),
        lr=S(3e-3, "peak learning rate (linear warmup, then cosine)", lo="(0"),
        warmup=S(warmup, "warmup steps", lo=0),
        **extra,
    )


def _demo() -> Section:
    # Small transformers learn to copy, and to add, in a sudden phase change whose timing
    # varies with the seed: at 300 base steps one seed's router base had not learnt to copy
    # (loss 0.74 against 0.02); at 450-600 steps the math expert reached 14-58%, and at 300
    # steps one seed's code expert 43%. The budgets below leave room for the late seeds; the
    # reduced run keeps them (weak experts show nothing) and saves time on the router side.
    experts = _lm_stage(
        600, 20, "the experts: the base fine-tuned on its own domain (stage lm)",
        steps_by_domain=S({"math": 1000},
            "{domain: steps} where a domain needs another budget (addition is learnt last)",
            lo=1))
    return section(
        ("The demo pipeline (fr_jax/toy/pipeline.py): what it builds besides the router, and "
         "how it runs."),
        progress=S(True, "log each step and show training's progress bars"),
        start_from=S("",
            ("a bundled world's folder (or another run's): its bases and experts are adopted, "
             "not trained; refused unless drawn with this world's settings")),
        bundle=S("", "a folder: also write the trained router, experts and baselines there"),
        baselines=S(True,
            ("False: the router's side only (no fine-tuned, merged or SharedTrunkNet "
             "baselines), evaluated on the eval.modes that need none of them")),
        cdpo_batch_size=S(16,
            ("rows per update of router stage 2 (CDPO), which the demo runs as a run of its own; "
             "train.batch_size is every other stage's"), lo=1),
        expert_model=_model(96, 3, 256, 4, 2,
                            "the experts and their base: Llama-3 architecture"),
        # 3 x 64 is the router of the ablation's pick, `mix` (docs/training.md): the highest
        # FusionRoute average among the variants within a point of expert_only on every
        # skill domain (3 seeds, reduced world). Larger routers solve more of `mixed` but
        # lose more than a point of math there.
        router_model=_model(64, 3, 192, 4, 2, "the router and its base"),
        base=_lm_stage(600, 30, "the experts' base: 'pretrained' on world.base_mix (stage lm)"),
        router_base=_lm_stage(600, 30, "the router's base: the same pretraining, its own size"),
        experts=experts,
        merge=section(
            "the merging baselines over the experts and their base (fr_jax.baselines.merging)",
            ta_lambda=S(0.5, "task arithmetic: base + ta_lambda * sum of task vectors",
                        lo=-10, hi=10),
            ties_density=S(0.2, "TIES: share of each task vector kept", lo="(0", hi=1),
            ties_lambda=S(1.0, "TIES: scale of the merged task vector", lo=-10, hi=10),
        ),
    )


DEMO_SECTIONS = {"world": _world, "demo": _demo}


def demo_sections() -> dict:
    """{section name: Section} the demo adds to the base config."""
    return {name: make() for name, make in DEMO_SECTIONS.items()}


def demo_config() -> ml_collections.ConfigDict:
    """The base config with the demo's two sections, every field at its default."""
    c = base_config()
    for name, node in build(demo_sections()).items():
        c[name] = node
    return c


def demo_field_docs() -> dict:
    """{dotted field: its description} of the demo's own sections."""
    return docs(demo_sections())
