"""`python -m fr_jax.plan`: will it fit, and how fast will it run? Every program a config
runs, compiled ahead of time by the TPU compiler for a TPU slice, on a machine with no TPU
(fr_jax/aot).

    python -m fr_jax.plan --config=configs/gemma2.py --topology=v5e-8
    python -m fr_jax.plan --config=configs/llama3.py --topology=v4-16 --config.train.batch_size=64
    python -m fr_jax.plan --config=configs/llama3.py --topology=v5e-8,v5p-8 --json=plan.json

The exit status is 0 only if every program fits on every slice.
"""

from __future__ import annotations

import dataclasses
import json
import sys

from fr_jax import cli
from fr_jax.aot import SLICES, check_slice, plan_slice

COMMAND = cli.Command("plan", "gemma2.py", (
    cli.Flag("topology", "plan.topology", f"TPU slice, one of {', '.join(SLICES)}; several, "
             "comma-separated, are planned one after the other"),
    cli.Flag("json", None, "also write the results as JSON here"),
), devices=False,
    sections=("plan", "mesh", "model"), doc="docs/planning.md")


def plan(config, fv) -> int:
    """Plans every slice of plan.topology; returns the exit status (0: everything fits)."""
    names = [n.strip() for n in config.plan.topology.split(",")]
    for slice_name in names:  # every name checked before anything is compiled
        check_slice(slice_name)
    planned = []
    for slice_name in names:
        results, report = plan_slice(config, slice_name)
        print(report if len(names) == 1 else f"## {slice_name}\n\n{report}\n", flush=True)
        planned.append({"slice": slice_name,
                        "results": [dataclasses.asdict(r) for r in results]})
    if fv is not None and fv.json:
        with open(fv.json, "w") as f:
            json.dump(planned[0] if len(planned) == 1 else {"slices": planned}, f, indent=1)
    return 0 if all(r["fits"] for p in planned for r in p["results"]) else 1


def main(argv=None):
    return cli.main(COMMAND, plan, argv)


if __name__ == "__main__":
    sys.exit(main())
