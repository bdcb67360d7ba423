"""The programs a training run is made of, each jitted with in/out shardings over the mesh:
the losses of each stage (losses.py: SFT on informative tokens, CDPO, method.md; objectives.py:
the loss per stage over the router and the frozen experts), the optimizer step (stage.py:
params and optimizer state sharded alike by the logical-axis rules, batches over data/fsdp),
the frozen models' precomputed outputs (precompute.py), the held-out sample decode
(samples.py) and what each phase keeps resident (residency.py). The loop that runs them is
fr_jax.loop; the planner compiles the same programs for TPU slices (fr_jax.aot).

losses.py -> objectives.py -> stage.py -> precompute.py; samples.py, residency.py beside.
"""

from fr_jax.steps.objectives import sft_needs_experts  # noqa: F401
from fr_jax.steps.precompute import reference_program, signals_program  # noqa: F401
from fr_jax.steps.stage import (Stage, TrainState, abstract_state, build_stage,  # noqa: F401
                                frozen_cfg, init_state, make_train_step, micro_batch_size,
                                trained_cfg)
