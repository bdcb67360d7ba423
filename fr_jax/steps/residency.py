"""What a training stage keeps on its devices, phase by phase, and the means to keep no more.

One table (`resident`) says, for each phase of a stage (its precomputes, its steps, its
evaluation, its sample decodes), which models sit in device memory besides the phase
program's own arguments. The loop frees or offloads by it and `fr_jax.plan` adds those
buffers to each program's total, so the plan's memory is the run's and not one step's.

The models a phase can hold: `router` (the stage's incoming router params, until the train
state takes them over), `state` (the train state: params and optimizer state), `experts`
(the frozen experts), `ref` (CDPO's reference router, in the frozen dtype), `sampler` (a
sample decode's copies of the trained router and the experts in the decoding layout).
"""

from __future__ import annotations

from typing import Dict, FrozenSet

import jax
import jax.numpy as jnp

from fr_jax.steps.objectives import sft_needs_experts

PHASES = ("signals", "reference", "step", "eval", "sample", "export")


def in_step(name: str, stage_cfg) -> FrozenSet[str]:
    """The frozen models the stage's train and eval steps take as arguments."""
    if name == "lm":
        return frozenset()
    if name == "sft":
        return frozenset({"experts"}) if sft_needs_experts(stage_cfg) else frozenset()
    return frozenset({"experts"} if stage_cfg.reference == "precompute"
                     else {"experts", "ref"})


def resident(name: str, config) -> Dict[str, FrozenSet[str]]:
    """phase -> the models on the devices while that phase's program runs (its arguments
    included). Phases a stage does not have are left out. A sample decode runs on the
    decoding mesh (an FSDP layout in a token loop gathers the weights), beside the train
    state: the experts leave the step's layout for host memory, and come back from there
    in the decoding layout for the decode only. The export gathers the trained router to
    every process, leaf by leaf (a program only where its params span several)."""
    tc = config.train
    stage_cfg = tc[name]
    step = in_step(name, stage_cfg) | {"state"}
    out = {"step": step, "eval": step}
    if name == "sft" and stage_cfg.expert_signals == "precompute":
        out["signals"] = frozenset({"router", "experts"})
    if name == "cdpo" and stage_cfg.reference == "precompute":
        out["reference"] = frozenset({"router", "experts", "ref"})
    if name != "lm" and tc.sample_every:
        out["sample"] = (step - {"experts"}) | {"sampler"}
    if name != "lm":  # the stage's state is gone; experts the steps took are still here
        out["export"] = frozenset({"router"}) | (in_step(name, stage_cfg) & {"experts"})
    return out


def after_precompute(name: str, config) -> str:
    """What becomes of the experts once a stage's precomputes are done: "keep" (the steps
    take them), "host" (sample decodes or a later stage of the same command need them
    again: they wait in host memory) or "drop"."""
    tc = config.train
    if "experts" in in_step(name, tc[name]):
        return "keep"
    stages = list(tc.stages)
    later = stages[stages.index(name) + 1:] if name in stages else []
    return "host" if (name != "lm" and tc.sample_every) or later else "drop"


class Parked:
    """A frozen model's params that leave the devices while no program uses them: moved to
    the host's memory (`park`, back with `get`) or deleted (`drop`). Every holder of the
    arrays must go through this object, or the device copy outlives `park`."""

    def __init__(self, params):
        self._params = params
        self._device = None  # the shardings to come back to, while parked

    def copy_to(self, shardings):
        """A copy of the parked params on the devices in `shardings` (they stay parked):
        the caller owns the copy and deletes it."""
        if self._params is None or self._device is None:
            raise RuntimeError("copy_to needs parked params (park them first)")
        return jax.device_put(self._params, shardings)

    def get(self):
        """The params on the devices (moved back if parked)."""
        if self._params is None:
            raise RuntimeError("these params were dropped")
        if self._device is not None:
            self._params = jax.device_put(self._params, self._device)
            self._device = None
        return self._params

    def park(self):
        """To host memory (pinned, for fast transfers back), keeping each shard on its
        process; the device buffers are freed."""
        if self._params is None or self._device is not None:
            return
        self._device = jax.tree.map(lambda x: x.sharding, self._params)
        host = jax.tree.map(lambda s: s.with_memory_kind("pinned_host"), self._device)
        params, self._params = self._params, jax.device_put(self._params, host)
        _delete(params)

    def drop(self):
        _delete(self._params)
        self._params = self._device = None


def _delete(tree):
    for x in jax.tree.leaves(tree):
        if isinstance(x, jax.Array) and not x.is_deleted():
            x.delete()


def copy_as(tree, dtype, shardings):
    """A copy of `tree` in `dtype` with new buffers (jit would forward an unchanged input
    as its output, and a later donation of the original would then free the copy too)."""
    return jax.jit(lambda t: jax.tree.map(lambda x: jnp.copy(x.astype(dtype)), t),
                   out_shardings=shardings)(tree)


def take_over(tree):
    """Deletes the buffers of params a stage was handed and no longer needs (its restored
    state replaced them): the caller's references to them are dead from here on."""
    _delete(tree)
