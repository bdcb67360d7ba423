"""Training the router: stage 1 SFT on informative tokens, stage 2 CDPO (method.md); and
stage `lm`: one ordinary model fine-tuned on the SFT data (experts, the fine-tuned baseline).

Each stage is a jitted step with in/out shardings over the mesh (params and optimizer state
sharded alike by the logical-axis rules; batches over data/fsdp), checkpointed with Orbax
(params, optimizer state, step, data position, RNG; atomic; the last K kept) and resumed
from the latest good checkpoint, even onto another mesh. The experts are frozen inputs of
the step: never differentiated, never in the optimizer state.

objectives.py (losses per stage) -> stage.py (optimizer, pjit steps) -> precompute.py
(frozen models' outputs cached) -> loop.py (the loop, `train`, `finetune`); record.py (what a
resume must match), watch.py (divergence) and workdir.py (one run per workdir) beside it.
"""

from fr_jax.training.loop import finetune, run_stage, train  # noqa: F401
from fr_jax.training.objectives import sft_needs_experts  # noqa: F401
from fr_jax.training.precompute import (precompute_reference, precompute_signals,  # noqa: F401
                                        reference_program, signals_program)
from fr_jax.training.stage import (Stage, TrainState, abstract_state, build_stage,  # noqa: F401
                                   frozen_cfg, init_state, make_train_step, micro_batch_size,
                                   trained_cfg)
