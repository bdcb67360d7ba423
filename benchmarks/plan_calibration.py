"""The plan against a measured system (fr_jax/aot/calibration.py): fr_jax's stage `lm`
on Llama-3.1-8B at MaxText's v6e-8 recipe, compiled for the slice, its predicted MFU bounds
next to MaxText's measured MFU. Prints the table row of docs/planning.md and writes the
Result as JSON (--json).

    python benchmarks/plan_calibration.py --json=benchmarks/results/plan_calibration.json
    python benchmarks/plan_calibration.py --depth=2   # 2 layers: the mechanism, quickly
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from fr_jax.aot.calibration import MAXTEXT, calibrate, row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--topology", default=MAXTEXT["slice"])
    ap.add_argument("--depth", type=int, default=0, help="layers (0: the model's own)")
    ap.add_argument("--json", default="", help="also write the Result here")
    args = ap.parse_args(argv)
    r = calibrate(args.topology, args.depth)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dataclasses.asdict(r), f, indent=1)
    print("| program | memory per chip | step (overlap..no overlap) | collectives | MFU ceiling "
          "| MFU, no overlap | measured |\n|---|---|---|---|---|---|---|\n" + row(r))
    return 0 if r.fits else 1


if __name__ == "__main__":
    sys.exit(main())
