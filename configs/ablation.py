"""The router-training ablation in the demo world: `python -m fr_jax.ablate`.

    python -m fr_jax.ablate                                   # every variant, seeds 0, 1, 2
    python -m fr_jax.ablate --config.variants="('router_lm', 'fused_all')" --config.seeds="(0,)"
    python -m fr_jax.ablate --config=configs/ablation.py:full # on the full world (trains its
                                                              # experts once, then the routers;
    # --config.common="('demo.start_from=fr_jax/toy/assets/world',)" adopts the bundled ones,
    # which are the full world's seed-0 experts: docs/training.md's full-world rows)
    python -m fr_jax.ablate --config=configs/ablation.py:scale  # the scale sweep: router (and
                                                              # expert) sizes, with baselines

Each variant is a set of changes to configs/demo.py, written as its fields (the base
config's, e.g. train.sft.lm_target, and the demo's own, e.g. demo.router_model.hidden_size);
`common` ("field=value" strings) is applied to every run before it. The experts and their
base are trained once (or adopted: the reduced world starts from the bundled ones) and only
the router is trained per variant and seed (SFT, preference pairs, CDPO), then evaluated by
the harness on the modes in `modes`. docs/training.md states each variant as a
formula.
"""

import ml_collections

from fr_jax.config import nested


# The study ran on the 3 x 64 router (the demo's default then, and again with `mix`; 3 x 80
# in between): every variant is written on it, so each reruns as docs/training.md's table
# reports it; the capacity variants set their own size.
def _router(hidden: int, ff: int, layers: int = 3, model: str = "router_model") -> dict:
    return {f"demo.{model}.hidden_size": hidden, f"demo.{model}.intermediate_size": ff,
            f"demo.{model}.num_layers": layers}


STUDY_ROUTER = _router(64, 192)
# Stage 2 as the study ran it (the demo's default before the guard variants won): CDPO alone,
# the routing head frozen, the routing-KL anchor on. Pinned like the router's size, so the
# earlier variants keep their meaning whatever the demo's default.
STUDY_CDPO = {"train.cdpo.sft_weight": 0.0, "train.cdpo.head": "frozen",
              "train.cdpo.route_kl": 1.0}
# Stage 1's generator term as the study ran it (the router's own LM), pinned for the same
# reason: the demo's default is `mix` since the whole table was rerun.
STUDY_SFT = {"train.sft.lm_target": "router"}
DEMO_ROUTER = _router(80, 224)  # the demo's default router when the guard variants ran
# The scale sweep's largest step: 4 blocks x 128, larger than an expert (3 x 96).
LARGE = dict(hidden=128, ff=352, layers=4)
# The modes of the scale sweep: FusionRoute against each baseline the issue names.
SCALE_MODES = ("fusionroute", "expert_only", "router_only", "finetuned", "sequence")


def _variant(**fields):
    """A variant's changes from dotted keys: _variant(**{"train.sft.lm_target": "fused"})."""
    return nested({**STUDY_ROUTER, **STUDY_CDPO, **STUDY_SFT, **fields})


def get_config(arg: str = ""):
    if arg not in ("", "quick", "full", "scale"):
        raise ValueError("configs/ablation.py takes '' (the reduced world), 'full' or 'scale' "
                         f"(the scale sweep on the reduced world), got {arg!r}")
    full = arg == "full"
    c = ml_collections.ConfigDict()
    # The scale sweep shares the reduced ablation's folder: its router-size runs are that
    # table's rows too (a run missing a mode is finished, not retrained).
    c.workdir = "runs/ablation-full" if full else "runs/ablation"
    c.demo = "full" if full else "quick"  # configs/demo.py:<this>, the world and budgets
    c.seeds = (0, 1, 2)
    # Each finished run's results, and the tables, are also kept here (committed: the
    # evidence behind docs/training.md's tables), under <demo>/; a run kept for the same
    # definition is read back instead of trained. "" keeps nothing.
    c.results_dir = "docs/results/ablation"
    c.progress = True
    c.modes = ("fusionroute", "expert_only", "router_only")
    # Changes to the demo config for every run, "field=value" each (e.g.
    # "train.sft.steps=400").
    c.common = ()

    d = ml_collections.ConfigDict()
    # Stage 1's generator term.
    d.router_lm = _variant(**{"train.sft.lm_target": "router"})  # the router's own LM
    d.fused_all = _variant(**{"train.sft.lm_target": "fused", "train.sft.lm_positions": "all"})
    d.fused_informative = _variant(**{"train.sft.lm_target": "fused",
                                      "train.sft.lm_positions": "informative"})
    d.mix = _variant(**{"train.sft.lm_target": "mix", "train.sft.lm_mix": 0.5})
    # Router capacity: the study's 3 x 64, one in between (3 x 80), one as large as an
    # expert (3 x 96).
    d.router_mid = _variant(**_router(80, 224))
    d.router_expert_size = _variant(**_router(96, 256))
    # Routing loss, CDPO's settings and its pairs.
    d.best_expert = _variant(**{"train.sft.routing_loss": "best_expert"})
    d.beta_0_1 = _variant(**{"train.cdpo.beta": 0.1})
    d.no_route_kl = _variant(**{"train.cdpo.route_kl": 0.0})
    d.pairs_x2 = _variant(**{"pairs.sources.toy.limit": 3200 if full else 1600})
    d.chosen_reference = _variant(**{"pairs.chosen": "reference"})
    # The two levers that moved `mixed` most, together: the 3 x 80 router with the mix.
    d.mid_mix = _variant(**_router(80, 224), **{"train.sft.lm_target": "mix",
                                                "train.sft.lm_mix": 0.5})
    # The paper's guard in stage 2: stage 1's loss kept on during CDPO (train.cdpo.sft_weight),
    # the routing head trained by it alone (head=sft), without the routing-KL anchor
    # (sft_mix) or with it (sft_mix_kl), at two weights; on the 3 x 80 router (the demo's
    # then), so each compares with router_mid (the default then).
    for weight, tag in ((0.3, "0_3"), (1.0, "1")):
        guard = {**DEMO_ROUTER, "train.cdpo.sft_weight": weight, "train.cdpo.head": "sft"}
        d[f"sft_mix_{tag}"] = _variant(**guard, **{"train.cdpo.route_kl": 0.0})
        d[f"sft_mix_kl_{tag}"] = _variant(**guard)
    # Scale: a router larger than an expert, then experts and router both 4 x 128 (the
    # experts trained once for it, seed 0, like the full world's).
    d.router_4x128 = _variant(**_router(**LARGE))
    d.experts_4x128 = _variant(**_router(**LARGE), **_router(**LARGE, model="expert_model"))
    c.definitions = d
    # Which of `definitions` to run, in this order (the table's).
    c.variants = ("router_lm", "fused_all", "fused_informative", "mix", "router_mid",
                  "router_expert_size", "best_expert", "beta_0_1", "no_route_kl", "pairs_x2",
                  "chosen_reference", "mid_mix", "sft_mix_0_3", "sft_mix_1", "sft_mix_kl_0_3",
                  "sft_mix_kl_1")
    if arg == "scale":
        c.modes = SCALE_MODES
        c.variants = ("router_lm", "router_mid", "router_expert_size", "router_4x128",
                      "experts_4x128")
    return c
