"""The router-training ablation in the demo world: `python -m fr_jax.ablate`.

    python -m fr_jax.ablate                                   # every variant, seeds 0, 1, 2
    python -m fr_jax.ablate --config.variants="('router_lm', 'fused_all')" --config.seeds="(0,)"
    python -m fr_jax.ablate --config=configs/ablation.py:full # on the full world (trains its
                                                              # experts once, then the routers)

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


# The study ran on the 3 x 64 router (the demo's default then, 3 x 80 since): every variant
# is written on it, so each reruns as docs/training.md's table reports it; the capacity variants set
# their own size.
def _router(hidden: int, ff: int) -> dict:
    return {"demo.router_model.hidden_size": hidden, "demo.router_model.intermediate_size": ff}


STUDY_ROUTER = _router(64, 192)


def _variant(**fields):
    """A variant's changes from dotted keys: _variant(**{"train.sft.lm_target": "fused"})."""
    return nested({**STUDY_ROUTER, **fields})


def get_config(arg: str = ""):
    if arg not in ("", "quick", "full"):
        raise ValueError(f"configs/ablation.py takes '' (the reduced world) or 'full', got {arg!r}")
    full = arg == "full"
    c = ml_collections.ConfigDict()
    c.workdir = "runs/ablation-full" if full else "runs/ablation"
    c.demo = "full" if full else "quick"  # configs/demo.py:<this>, the world and budgets
    c.seeds = (0, 1, 2)
    c.progress = True
    c.modes = ("fusionroute", "expert_only", "router_only")
    # Changes to the demo config for every run, "field=value" each (e.g.
    # "train.sft.steps=400").
    c.common = ()

    d = ml_collections.ConfigDict()
    # Stage 1's generator term.
    d.router_lm = _variant(**{"train.sft.lm_target": "router"})  # the router's own LM (default)
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
    c.definitions = d
    # Which of `definitions` to run, in this order (the table's).
    c.variants = ("router_lm", "fused_all", "fused_informative", "mix", "router_mid",
                  "router_expert_size", "best_expert", "beta_0_1", "no_route_kl", "pairs_x2",
                  "chosen_reference", "mid_mix")
    return c
