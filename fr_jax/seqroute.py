"""Sequence-level routing baseline (SharedTrunkNet, arXiv 2603.20895): label, probe, train,
evaluate.

    python -m fr_jax.seqroute                           # on the bundled toy world
    python -m fr_jax.seqroute --config=configs/llama3.py --config.seqroute.data=/data/l.jsonl

Every target (each expert alone and FusionRoute) answers the labelled prompts; answers are
scored and cached; Fisher separability / effective dimensionality probes choose an encoder
layer; a SharedTrunkNet is trained on that layer's pooled prefill activations; the accuracy
-cost sweep and the headline metrics are printed and written under seqroute.workdir, and
the trained net (trunk/) is what decode mode `sequence` loads (--config.seqroute.path).
See fr_jax/baselines/seqroute.py.
"""

from __future__ import annotations

import os
import sys


def run(config) -> dict:
    from fr_jax import sharding as sh
    from fr_jax.baselines import seqroute as S
    from fr_jax.decode import load_world
    from fr_jax.eval.modes import Lineup
    from fr_jax.eval.scoring import get_scorer
    from fr_jax.fusion import Mode
    from fr_jax.hf import load_hf

    s = config.seqroute
    scorer = get_scorer(s.scorer)
    mesh = sh.mesh_from_config(config.mesh)
    router, experts, params, tok, names, _, _ = load_world(config, Mode.parse("fusionroute"),
                                                            mesh)
    source = {"router": config.router.path or "(bundled)",
              "experts": list(config.experts.paths) or "(bundled)"}
    lineup = Lineup(router, experts, params, tok, names, source=source)
    data = s.data
    if not data:
        from fr_jax.toy.demo import ensure_world_data
        from fr_jax.toy.tiny import default_home
        data = ensure_world_data(default_home())["labelled"]
    tasks = S.read_labelled(data)
    if s.encoder:
        enc_cfg, enc_params = load_hf(s.encoder, config.model.dtype,
                                      config.model.param_dtype or None)
        encoder = (os.path.abspath(s.encoder), enc_cfg, enc_params)
    else:
        encoder = ("router", router.cfg, params["router"]["backbone"])
    print(f"seqroute: {len(tasks)} labelled prompts from {data}; experts {', '.join(names)}")
    report = S.build(lineup, tasks, s, s.workdir, encoder, scorer, progress=sys.stderr.isatty())
    print("\n" + report["probes_markdown"])
    print(S.report_markdown(report))
    print(f"wrote {', '.join(report['paths'].values())}; decode with "
          f"--mode=sequence --config.seqroute.path={report['paths']['trunk']}")
    return report


def main(argv=None):
    from fr_jax.config import default_config_file, parse_flags
    from fr_jax.fusion import ModeError
    from fr_jax.hf import CheckpointError
    from fr_jax.models import ConfigError

    argv = list(sys.argv[1:] if argv is None else argv)
    fv = parse_flags(["fr_jax.seqroute"] + argv, default_config_file("tiny.py"))
    try:
        return run(fv.config)
    except (CheckpointError, ConfigError, ModeError, FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
