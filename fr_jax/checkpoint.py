"""Orbax checkpoints of a training stage: save every N steps, keep the last K, resume from
the latest good one, restore onto whatever mesh is current.

Orbax writes each step into a temporary folder and renames it when complete, so a crash
mid-save never leaves a step that looks finished; a step that is nevertheless unreadable
(a disk error, a half-copied folder) is skipped with a warning in favour of the previous.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Optional, Tuple

import jax
import orbax.checkpoint as ocp

log = logging.getLogger("fr_jax.checkpoint")


class Checkpointer:
    def __init__(self, directory: str, keep: int = 3):
        self.directory = os.path.abspath(directory)
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                                 enable_async_checkpointing=False),
            item_names=("state", "meta"))

    def steps(self):
        return sorted(self.manager.all_steps())

    def save(self, step: int, state, meta: dict):
        """Saves (state pytree, JSON meta) as `step`; returns once it is on disk."""
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)
        self.manager.wait_until_finished()

    def restore_latest(self, abstract_state) -> Optional[Tuple[Any, dict, int]]:
        """(state, meta, step) of the newest readable checkpoint, placed with the shardings
        in `abstract_state` (ShapeDtypeStructs); None when there is none."""
        for step in reversed(self.steps()):
            try:
                out = self.manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
                return out.state, out.meta, step
            except Exception as e:  # any unreadable step: fall back to the previous one
                log.warning("checkpoint step %d in %s is unreadable (%s: %s); trying the "
                            "previous one", step, self.directory, type(e).__name__,
                            str(e).splitlines()[0][:200])
        return None

    def close(self):
        self.manager.close()


def abstract_like(tree, shardings):
    """ShapeDtypeStructs of `tree` (arrays or shapes) carrying `shardings`."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        tree, shardings)
