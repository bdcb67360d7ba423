"""Orbax checkpoints of a training stage: save every N steps, keep the last K, resume from
the latest good one, restore onto whatever mesh is current.

Orbax writes each step into a temporary folder and renames it when complete, so a crash
mid-save never leaves a step that looks finished. A step that is nevertheless bad (a file
deleted or truncated, bytes flipped on disk) fails to restore, restores to non-finite
values, or restores to values whose checksum (per-leaf, saved with the step: see
`checksum`) no longer matches: it is moved aside into `<directory>.corrupt/` (never
deleted), with a warning, and the previous step is tried. Resuming from an earlier step
than the newest (`restore(upto=...)`) moves the later steps aside into
`<directory>.abandoned/`, so nothing a run saved is ever deleted by going back. A save that
fails (disk full) raises a CheckpointError that says the earlier steps are intact.
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

from fr_jax.runtime import distributed
from fr_jax.runtime.errors import CheckpointError

log = logging.getLogger("fr_jax.loop.checkpoint")


@jax.jit
def _sums(tree):
    return [jnp.stack([jnp.sum(x.astype(jnp.float32)), jnp.sum(jnp.abs(x.astype(jnp.float32)))])
            for x in jax.tree.leaves(tree)]


def fingerprint(tree) -> List[List[float]]:
    """Per leaf [sum, sum of |x|] in float32: what a restored state must reproduce, to a
    reduction-order tolerance (the restoring mesh may differ from the saving one)."""
    return [[float(a), float(b)] for a, b in jax.device_get(_sums(tree))]


def _words(x):
    """The leaf's bits as uint32 words, in the leaf's own shape (8-byte types with a
    trailing axis of 2): narrower types widened, by bitcast, so every bit of the stored
    value is in some word. No reshape: on a sharded leaf a flatten could move data."""
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    size = x.dtype.itemsize
    if size < 4:
        return jax.lax.bitcast_convert_type(x, {1: jnp.uint8, 2: jnp.uint16}[size]) \
            .astype(jnp.uint32)
    return jax.lax.bitcast_convert_type(x, jnp.uint32)


def _odd_positions(shape):
    """2i + 1 for each element's row-major index i (modulo 2**32), built from iotas in the
    array's own shape."""
    index = jnp.zeros(shape, jnp.uint32)
    for axis, n in enumerate(shape):
        index = index * jnp.uint32(n) + jax.lax.broadcasted_iota(jnp.uint32, shape, axis)
    return index * 2 + 1


@jax.jit
def _checksums(tree):
    out = []
    for x in jax.tree.leaves(tree):
        w = _words(x)
        out.append(jnp.stack([jnp.sum(w, dtype=jnp.uint32),
                              jnp.sum(w * _odd_positions(w.shape), dtype=jnp.uint32)]))
    return out


def checksum(tree) -> List[List[int]]:
    """Per leaf [sum of its words, sum of word i times (2i+1)], both modulo 2**32, over the
    logical array's bits (`_words`). Integer addition modulo 2**32 is exact and
    order-free, so any mesh, sharding or process count gives the same numbers (float sums
    do not, hence the old tolerance that let small flips through). A single flipped bit
    changes one word by +-2**k (k < 32), which moves the first sum by +-2**k and the
    second by +-(2i+1) * 2**k, neither 0 modulo 2**32: every single-bit flip is caught, by
    both; the odd weights also catch most swaps of words, which the plain sum cannot."""
    return [[int(a), int(b)] for a, b in jax.device_get(_checksums(tree))]


def _mismatch(saved, got) -> Optional[str]:
    """Why `got` is not the state whose fingerprint is `saved` (None when it is): the
    check of steps saved before `checksum` existed."""
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


def _verify(meta, state) -> Optional[str]:
    """Why a restored `state` is not the one saved with `meta` (None when it is): the exact
    checksum where the step has one, else the float fingerprint of older steps."""
    if "checksum" in meta:
        got = checksum(state)
        if len(got) != len(meta["checksum"]):
            return f"{len(got)} arrays where {len(meta['checksum'])} were saved"
        leaves = jax.tree_util.tree_leaves_with_path(state)
        for (path, _), s, g in zip(leaves, meta["checksum"], got):
            if list(s) != g:
                return f"{jax.tree_util.keystr(path)}'s checksum {g} differs from the saved {s}"
        return None
    if "fingerprint" in meta:
        return _mismatch(meta["fingerprint"], fingerprint(state))
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
        # The float sums find non-finite values (kept for that); the checksum is what a
        # restore must reproduce exactly.
        meta = dict(meta, fingerprint=fingerprint(state), checksum=checksum(state))
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

    def restore_latest(self, abstract_state, upto: Optional[int] = None
                       ) -> Optional[Tuple[Any, dict, int]]:
        """(state, meta, step) of the newest good checkpoint (of those at or before step
        `upto`, when given), placed with the shardings in `abstract_state`
        (ShapeDtypeStructs); None when there is none. Bad steps are moved aside on the way,
        and so are the steps after the one restored (see the module docstring)."""
        for step in reversed([s for s in self.steps() if upto is None or s <= upto]):
            try:
                out = self.manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
                why = _verify(out.meta, out.state)
            except Exception as e:  # any unreadable step: fall back to the previous one
                why = f"unreadable: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
            if why is None:
                later = [s for s in self.steps() if s > step]
                if later:
                    self._move(later, ".abandoned")
                    log.warning("resuming %s from step %d: the steps after it (%s) were moved to "
                                "%s.abandoned/ (kept, not deleted)", self.directory, step,
                                ", ".join(map(str, later)), self.directory)
                return out.state, out.meta, step
            aside = self._move([step], ".corrupt")
            log.warning("checkpoint step %d in %s is bad (%s); moved it to %s and trying the "
                        "previous one", step, self.directory, why, aside)
        return None

    def _move(self, steps, suffix: str) -> str:
        """Moves `steps` into `<directory><suffix>/<step>-<time>`; returns the last one's."""
        stamp = int(time.time())
        for step in steps:
            aside = os.path.join(self.directory + suffix, f"{step}-{stamp}")
            if distributed.is_main():  # one mover; the others wait for it
                os.makedirs(os.path.dirname(aside), exist_ok=True)
                shutil.move(os.path.join(self.directory, str(step)), aside)
        distributed.barrier(f"fr_jax-move-{suffix}-{steps[0]}")
        self.manager.reload()
        return aside

    def close(self):
        self.manager.close()


def abstract_like(tree, shardings):
    """ShapeDtypeStructs of `tree` (arrays or shapes) carrying `shardings`."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        tree, shardings)
