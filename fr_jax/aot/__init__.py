"""Will it fit, and how fast will it run? Every program a config runs, compiled ahead of time
by the TPU compiler for a TPU slice, on a machine with no TPU (`python -m fr_jax.plan`).

`libtpu` (`pip install -e ".[tpu]"`) provides the compiler; `jax.experimental.topologies`
describes the slice's chips, and fr_jax's own jitted programs (the training stages' steps, the
expert-signal precompute, the fused decoder's prefill and chunk) are lowered from abstract
params (`jax.ShapeDtypeStruct`s at the checkpoints' shapes: their `config.json` when the
folders exist, else a built-in preset of the public architecture) and compiled for the slice.
Per chip, the table shows what the compiler allocates (params, optimizer state, frozen
models, caches, temporaries) against the chip's HBM, the FLOPs, HBM bytes and collectives of
one step, two bounds on its time (compute, memory and collectives fully overlapped, and the
collectives overlapping nothing), and at each the MFU of training steps and the share of the
HBM roofline of decode steps: ceilings, not forecasts. A plan passes only if every program
fits with `plan.headroom` to spare; for one that does not, the largest buffers (shape, the
op that made them) are listed.

XLA's cost analysis counts a loop body once, and fr_jax scans its layers, its loss blocks and
its micro-batches. So FLOPs come from the same program at depth 1 and 2 with every scan
unrolled (`ModelConfig.scan_unroll`), extrapolated linearly in depth, plus the FLOPs of the
fused attention kernel, which the cost analysis cannot see. HBM bytes come from the real
program's optimized HLO (`fr_jax.aot.hlo_traffic`: what crosses HBM, every loop as many
times as it runs; XLA's own count also counts the compiler's prefetches into on-chip memory), and so
do the collectives (each one's buffer, group and ring bytes, timed at the chip's ICI
bandwidth: the model is in compile.py), and memory from the real program at full depth.

fr_jax.runtime.hardware (chips, slices) -> shapes.py (model shapes, analytic FLOPs) ->
programs.py (fr_jax's programs from abstract params) -> compile.py (compile, measure, the time
model) -> tables.py (the report); calibration.py plans stage lm at MaxText's measured Llama-3.1-8B
recipe, to set the model's ceilings against a measured MFU.
"""

from fr_jax.aot.compile import (Result, _costs, compile_program, evaluate,  # noqa: F401
                                measure_costs)
from fr_jax.aot.programs import (Program, all_programs, decode_programs,  # noqa: F401
                                 serve_programs, train_programs)
from fr_jax.aot.shapes import PRESETS, model_config  # noqa: F401
from fr_jax.aot.tables import plan_slice, table  # noqa: F401
from fr_jax.runtime.hardware import CHIPS, SLICES, Chip, check_slice, topology_devices  # noqa: F401
