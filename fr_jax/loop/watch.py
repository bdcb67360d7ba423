"""Divergence caught while the values are still finite: the loss and gradient norm of every
update, checked at each logging boundary against the run's recent median and its peak."""

from __future__ import annotations

import jax
import numpy as np

from fr_jax.loop.checkpoint import Checkpointer
from fr_jax.runtime.errors import TrainError

WATCHED = ("loss", "grad_norm")  # a non-finite or spiking value of either stops the stage
SPIKE_WINDOW, SPIKE_AFTER = 20, 2  # a value is held to the median of the last 20 (of >= 2)
RISE = 2.0  # a value this times the median counts as part of a spike's rise


class Watch:
    """Stops a diverging stage while its values are still finite: by the time the loss is
    NaN the weights can already hold ~1e8, and so can the last checkpoints, so a re-run
    from the newest one diverges again. A spike is a value `train.spike_factor` times the
    median of the last SPIKE_WINDOW updates that is also above every earlier value of the
    run (a converged loss of 0.003 may blip 20-fold; it stays below the first losses). The
    error names the newest checkpoint saved before the rise began."""

    def __init__(self, stage: str, config, history, ckpt: Checkpointer):
        self.stage, self.ckpt, self.tc = stage, ckpt, config.train
        self.factor, self.lr = self.tc.spike_factor, self.tc[stage].lr
        # The restored history (logged updates) seeds it: a resume is judged at once.
        self.recent = {k: [(h["micro"], h[k]) for h in history if k in h][-SPIKE_WINDOW:]
                       for k in WATCHED}
        self.peak = {k: max([h[k] for h in history if k in h], default=-np.inf)
                     for k in WATCHED}

    def check(self, pending):
        """Raises TrainError at the first update in `pending` whose loss or gradient norm is
        not finite or spikes."""
        for micro, values in jax.device_get(pending):
            for k, v in values.items():
                v, past = float(v), self.recent[k]
                median = float(np.median([x for _, x in past])) if past else 0.0
                if not np.isfinite(v):
                    raise TrainError(self._nan(k, v, micro, median))
                if (self.factor and len(past) >= SPIKE_AFTER and median > 0
                        and v > self.factor * median and v > self.peak[k]):
                    raise TrainError(self._spike(k, v, micro, median))
                past.append((micro, v))
                del past[:-SPIKE_WINDOW]
                self.peak[k] = max(self.peak[k], v)

    def _good_step(self, k: str, micro: int, median: float):
        """(first update of the rise, newest checkpoint before it or None). The metrics of
        update u are those of checkpoint u - 1, so a rise first seen at u leaves u - 2."""
        start = micro
        for m, x in reversed(self.recent[k]):
            if x <= RISE * median:
                break
            start = m
        good = [s for s in self.ckpt.steps() if s <= start - 2]
        return start, (good[-1] if good else None)

    def _fix(self, start: int, good) -> str:
        lower = f"--config.train.{self.stage}.lr={self.lr / 10:g}"
        if good is None:
            return (f"No checkpoint predates the rise (step {start}): start anew in another "
                    f"--config.train.workdir with a lower lr ({lower}), a longer warmup or a "
                    "lower train.clip.")
        return (f"Resume from step {good}, the last checkpoint saved before the rise began "
                f"(step {start}), with a lower lr (or a longer warmup, a lower train.clip): "
                f"--config.train.resume_step={good} {lower} --config.train.accept_changes=True "
                "(later checkpoints are moved aside, not deleted).")

    def _nan(self, k, v, micro, median) -> str:
        steps = self.ckpt.steps()
        start, good = self._good_step(k, micro, median)
        if steps and good == steps[-1]:
            return (f"[{self.stage}] {k} is {v} at step {micro}: training stopped and nothing "
                    f"was exported; the latest checkpoint, step {steps[-1]}, is the last "
                    f"finite state and training resumes from it. Lower train.{self.stage}.lr "
                    "(or lengthen its warmup, lower train.clip) and re-run with "
                    "--config.train.accept_changes=True.")
        kept = (f"the latest checkpoint, step {steps[-1]}, is the last finite state but may "
                "hold diverging weights. " if steps else "no checkpoint was written. ")
        return (f"[{self.stage}] {k} is {v} at step {micro}: training stopped and nothing was "
                f"exported; {kept}" + self._fix(start, good))

    def _spike(self, k, v, micro, median) -> str:
        start, good = self._good_step(k, micro, median)
        recent = ", ".join(f"{x:.4g}" for _, x in self.recent[k][-5:] + [(micro, v)])
        return (f"[{self.stage}] {k} jumped to {v:.4g} at step {micro}, {v / median:.0f}x its "
                f"median {median:.4g} over the last {len(self.recent[k])} updates (recent: "
                f"{recent}): the run is diverging; training stopped and nothing was exported. "
                + self._fix(start, good) + f" If this is not divergence, raise "
                f"train.spike_factor ({self.factor:g}).")
