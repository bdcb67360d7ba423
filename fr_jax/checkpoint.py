"""Orbax checkpoints of a training stage: save every N steps, keep the last K, resume from
the latest good one, restore onto whatever mesh is current.

Orbax writes each step into a temporary folder and renames it when complete, so a crash
mid-save never leaves a step that looks finished. A step that is nevertheless bad (a file
deleted or truncated, bytes flipped on disk) fails to restore, restores to non-finite
values, or restores to values whose fingerprint (per-leaf sums saved with the step) no
longer matches: it is moved aside into `<directory>.corrupt/` (never deleted), with a
warning, and the previous step is tried. A save that fails (disk full) raises a
CheckpointError that says the earlier steps are intact.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from typing import Any, List, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from fr_jax import distributed
from fr_jax.errors import CheckpointError

log = logging.getLogger("fr_jax.checkpoint")


@jax.jit
def _sums(tree):
    return [jnp.stack([jnp.sum(x.astype(jnp.float32)), jnp.sum(jnp.abs(x.astype(jnp.float32)))])
            for x in jax.tree.leaves(tree)]


def fingerprint(tree) -> List[List[float]]:
    """Per leaf [sum, sum of |x|] in float32: what a restored state must reproduce, to a
    reduction-order tolerance (the restoring mesh may differ from the saving one)."""
    return [[float(a), float(b)] for a, b in jax.device_get(_sums(tree))]


def _mismatch(saved, got) -> Optional[str]:
    """Why `got` is not the state whose fingerprint is `saved` (None when it is)."""
    if len(saved) != len(got):
        return f"{len(got)} arrays where {len(saved)} were saved"
    for i, ((s, s_abs), (g, g_abs)) in enumerate(zip(saved, got)):
        if not (np.isfinite(g) and np.isfinite(g_abs)):
            return f"array {i} holds non-finite values"
        tol = 1e-4 * s_abs + 1e-6
        if abs(g_abs - s_abs) > tol or abs(g - s) > tol:
            return f"array {i}'s sums ({g:.6g}, {g_abs:.6g}) differ from the saved " \
                   f"({s:.6g}, {s_abs:.6g})"
    return None


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
        meta = dict(meta, fingerprint=fingerprint(state))
        bad = [i for i, sums in enumerate(meta["fingerprint"]) if not np.all(np.isfinite(sums))]
        if bad:
            done = self.steps()
            raise CheckpointError(
                f"step {step} holds non-finite values (array {bad[0]} of the state) and was not "
                f"saved; " + (f"the latest checkpoint, step {done[-1]}, is intact" if done
                              else "no checkpoint was written"))
        try:
            self.manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)
            self.manager.wait_until_finished()
        except Exception as e:  # disk full, permissions, a peer gone: several types
            done = [s for s in self.steps() if s != step]
            text = str(e).splitlines()[0][:200] if str(e) else ""
            # Several processes write a step together: a failed collective means another
            # process of the launch died mid-save, not that this folder is at fault.
            peer = any(w in text for w in ("Gloo", "Connection reset", "heartbeat"))
            fix = ("another process of this launch stopped during the save; re-run the same "
                   "command on every host to resume." if peer else
                   "free space (or fix the folder) and re-run the same command to resume.")
            raise CheckpointError(
                f"could not write checkpoint step {step} to {self.directory} "
                f"({type(e).__name__}: {text}). "
                + (f"The last complete checkpoint, step {done[-1]}, is intact: " if done else
                   "No earlier checkpoint exists: ") + fix) from None

    def restore_latest(self, abstract_state) -> Optional[Tuple[Any, dict, int]]:
        """(state, meta, step) of the newest good checkpoint, placed with the shardings in
        `abstract_state` (ShapeDtypeStructs); None when there is none. Bad steps are moved
        aside on the way (see the module docstring)."""
        for step in reversed(self.steps()):
            try:
                out = self.manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
                why = _mismatch(out.meta["fingerprint"], fingerprint(out.state)) \
                    if "fingerprint" in out.meta else None
            except Exception as e:  # any unreadable step: fall back to the previous one
                why = f"unreadable: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
            if why is None:
                return out.state, out.meta, step
            self._set_aside(step, why)
        return None

    def _set_aside(self, step: int, why: str):
        aside = os.path.join(self.directory + ".corrupt", f"{step}-{int(time.time())}")
        if distributed.is_main():  # one mover; the others wait for it
            os.makedirs(os.path.dirname(aside), exist_ok=True)
            shutil.move(os.path.join(self.directory, str(step)), aside)
        distributed.barrier(f"fr_jax-set-aside-{step}")
        self.manager.reload()
        log.warning("checkpoint step %d in %s is bad (%s); moved it to %s and trying the "
                    "previous one", step, self.directory, why, aside)

    def close(self):
        self.manager.close()


def abstract_like(tree, shardings):
    """ShapeDtypeStructs of `tree` (arrays or shapes) carrying `shardings`."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        tree, shardings)
