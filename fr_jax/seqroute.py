"""`python -m fr_jax.seqroute`: the sequence-level routing baseline (SharedTrunkNet, arXiv
2603.20895): label, probe, train, evaluate (fr_jax/baselines/seqroute_pipeline.py).

    python -m fr_jax.seqroute                           # on the bundled toy world
    python -m fr_jax.seqroute --config=configs/llama3.py --config.seqroute.data=/data/l.jsonl

Every target (each expert alone and FusionRoute) answers the labelled prompts; answers are
scored and cached; Fisher separability / effective dimensionality probes choose an encoder
layer; a SharedTrunkNet is trained on that layer's pooled prefill activations; the accuracy
-cost sweep and the headline metrics are printed and written under seqroute.workdir, and
the trained net (trunk/) is what decode mode `sequence` loads (--config.seqroute.path).
"""

from __future__ import annotations

import os
import sys

from fr_jax import cli
from fr_jax.baselines import seqroute_pipeline as S
from fr_jax.harness.scoring import get_scorer
from fr_jax.hf import load_hf
from fr_jax.inference.lineup import lineup_from_config
from fr_jax.toy.world_data import bundled_world_data

COMMAND = cli.Command("seqroute", "tiny.py",
                      sections=("seqroute", "router", "experts"), doc="docs/baselines.md")


def train_seqroute(config, fv=None) -> dict:
    s = config.seqroute
    scorer = get_scorer(s.scorer)
    cli.use_bundled_world(config)
    data = s.data or bundled_world_data()["labelled"]
    lineup = lineup_from_config(config, ["fusionroute"])
    tasks = S.read_labelled(data)
    if s.encoder:
        enc_cfg, enc_params = load_hf(s.encoder, config.model.dtype,
                                      config.model.param_dtype or None)
        encoder = (os.path.abspath(s.encoder), enc_cfg, enc_params)
    else:
        encoder = ("router", lineup.router.cfg, lineup.params["router"]["backbone"])
    print(f"seqroute: {len(tasks)} labelled prompts from {data}; experts "
          f"{', '.join(lineup.expert_names)}")
    report = S.build(lineup, tasks, s, s.workdir, encoder, scorer, progress=sys.stderr.isatty())
    print("\n" + report["probes_markdown"])
    print(S.report_markdown(report))
    print(f"wrote {', '.join(report['paths'].values())}; decode with "
          f"--mode=sequence --config.seqroute.path={report['paths']['trunk']}")
    return report


def main(argv=None):
    return cli.main(COMMAND, train_seqroute, argv)


if __name__ == "__main__":
    main()
