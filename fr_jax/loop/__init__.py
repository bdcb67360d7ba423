"""The training run: stage 1 SFT, stage 2 CDPO (method.md) and stage `lm` (one plain model
fine-tuned on the SFT data), each a loop over fr_jax.steps' jitted step.

stages.py runs a stage end to end (`train`, `finetune`, `run_stage`): inputs.py feeds it
sharded batches, frozen_outputs.py computes the frozen models' outputs once before it,
checkpoint.py saves Orbax checkpoints (params, optimizer state, step, data position, RNG;
atomic; the last K kept) and resumes from the latest good one, even onto another mesh;
record.py holds what a resume must match, watch.py stops a diverging run, workdir.py keeps
one run per workdir, tensorboard.py writes the scalars.
"""

from fr_jax.loop.frozen_outputs import precompute_reference, precompute_signals  # noqa: F401
from fr_jax.loop.stages import finetune, run_stage, train  # noqa: F401
