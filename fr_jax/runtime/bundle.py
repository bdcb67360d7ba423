"""Where the trained toy world shipped in the package lives (`fr_jax/toy/assets/world`).

Only paths: the entry points (fr_jax/cli/command.py) fill in these folders when a config names no
checkpoints, so library code always receives paths and never reaches into the demo
pipeline that wrote them (fr_jax/toy/pipeline.py).
"""

from __future__ import annotations

import contextlib
import json
import os

import filelock

from fr_jax.runtime.errors import CheckpointError

BUNDLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "toy", "assets",
                      "world")
REGENERATE = "python -m fr_jax.demo --config.demo.bundle=fr_jax/toy/assets/world"


def default_home() -> str:
    """Where fr_jax writes what it generates once and reuses (tiny worlds, the bundled
    world's training files): $FR_JAX_HOME, else ~/.cache/fr_jax."""
    return os.environ.get("FR_JAX_HOME", os.path.join(os.path.expanduser("~"), ".cache", "fr_jax"))


@contextlib.contextmanager
def generating(folder: str):
    """Held while `folder` (generated once under fr_jax's home, then reused) is written:
    a second process that wants the same folder waits here, then finds it complete,
    instead of reading half-written files or writing the same files beside the first."""
    os.makedirs(os.path.dirname(os.path.abspath(folder)), exist_ok=True)
    with filelock.FileLock(os.path.abspath(folder) + ".lock"):
        yield


def bundled_world(path: str = BUNDLE) -> dict:
    """The trained toy world shipped in the package: {"router", "router_base", "experts",
    "base" (the experts' shared base), "merged" (TIES), "finetuned", "seqroute" (the
    SharedTrunkNet), "names", "results"} (folders; results.json is the table the bundling
    run measured, and names its experts in order)."""
    results = os.path.join(path, "results.json")
    if not os.path.isfile(results):
        raise CheckpointError(f"the bundled toy world at {path} has no results.json; "
                              f"regenerate it with `{REGENERATE}`")
    with open(results) as f:
        names = list(json.load(f)["expert_names"])
    world = {k: os.path.join(path, k) for k in ("router", "router_base", "base", "merged",
                                                "finetuned", "seqroute")}
    world.update(experts=[os.path.join(path, x) for x in names], names=names, results=results)
    missing = [p for p in [world["router"], world["router_base"]] + world["experts"]
               if not os.path.isfile(os.path.join(p, "config.json"))]
    if missing:
        raise CheckpointError(
            f"the bundled toy world is incomplete ({missing[0]} has no config.json); "
            f"regenerate it with `{REGENERATE}`, or point --config.router.path / "
            "--config.experts.paths at checkpoints")
    return world
