"""The plan against a measured system: fr_jax's dense stage `lm` (one model fine-tuned, no
routing) on Llama-3.1-8B, compiled at MaxText's published Llama-3.1-8B recipe for v6e-8, its
predicted MFU bounds next to the MFU MaxText measured with that recipe. The gap is what
the time model leaves out (latency, kernel efficiency, imperfect overlap) plus what the two
programs do differently (MaxText offloads activations to the host instead of fr_jax's full
rematerialisation, fuses its own kernels).

    python benchmarks/plan_calibration.py             # the full model (minutes per compile)
    python benchmarks/plan_calibration.py --depth=2   # 2 layers: the mechanism, quickly

`train_programs` plans the router stages (sft, cdpo) only; `lm_programs` builds stage lm's
step the same way, for `evaluate(..., build=lm_programs)`.
"""

from __future__ import annotations

from typing import List

from fr_jax import steps
from fr_jax.aot.compile import Result, evaluate
from fr_jax.aot.programs import Program, _abstract, _sft_rows
from fr_jax.aot.shapes import forward_flops, splash_flops
from fr_jax.config import real_family_config
from fr_jax.models import Model
from fr_jax.runtime import sharding as sh
from fr_jax.runtime.hardware import topology_devices

# MaxText's `llama3_1_8b_8192_no_collective_matmul` (benchmarks/maxtext_trillium_model_configs.py,
# run by AI-Hypercomputer/tpu-recipes training/trillium/Llama3.1-8B-MaxText/v6e-8): 3 rows a
# chip of 8192 tokens, FSDP over the 8 chips. Its measured MFU as issue 32 quotes it (the
# recipe's sample log, 413 TFLOP/s per chip, is 45.0% of 918).
MAXTEXT = dict(slice="v6e-8", arch="llama-3.1-8b", rows_per_chip=3, seq_len=8192, mfu=0.455)


def lm_programs(config, rcfg, ecfgs, meshes, single_expert: bool = False,
                hosts: int = 1) -> List[Program]:
    """Stage lm's training step for the model `rcfg` (all_programs' signature; the experts
    play no part)."""
    tc, seq, mesh = config.train, config.data.seq_len, meshes["train"]
    model = Model(steps.trained_cfg(rcfg, config))
    params = _abstract(model.param_shapes(), sh.param_shardings(model, mesh))
    stage = steps.build_stage("lm", model, None, mesh, tc.lm, tc, params, {}, rcfg.vocab_size)
    state = steps.abstract_state(stage, params)
    batch = _sft_rows(tc.batch_size, seq)
    step, _ = stage.jitted(batch)
    forwards = 1 + (model.cfg.remat != "none")  # a rematerialised layer runs forward twice
    return [Program("LM step (calibration)", "train", step, (state, {}, batch),
                    {"params": state.params, "optimizer": state.opt_state},
                    3 * forward_flops(rcfg, tc.batch_size * seq, (seq + 1) / 2),
                    kernel_flops=splash_flops(model.cfg, tc.batch_size, seq, forwards, True),
                    accum=max(tc.grad_accum, 1), uses=("router",))]


def calibration_config(chips: int, depth: int = 0, seq_len: int = MAXTEXT["seq_len"],
                       rows_per_chip: int = MAXTEXT["rows_per_chip"]):
    """The real-family defaults (bf16 activations, fp32 master weights, full remat, splash
    attention, blocked loss) at MaxText's recipe shape: pure FSDP, no micro-batches."""
    c = real_family_config(workdir="runs/calibration")
    c.train.stages = ("lm",)
    c.train.batch_size, c.train.grad_accum = rows_per_chip * chips, 1
    c.data.seq_len = seq_len
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor, c.mesh.expert = 1, -1, 1, 1
    c.router.path, c.experts.paths = "", ()
    c.plan.router_arch = c.plan.expert_arch = MAXTEXT["arch"]
    c.plan.n_experts, c.plan.programs, c.plan.depth = 1, ("train",), depth
    return c


def calibrate(slice_name: str = MAXTEXT["slice"], depth: int = 0, progress: bool = True,
              **shape) -> Result:
    """Plans stage lm at the recipe's shape on the slice (at `depth` layers when > 0)."""
    chip, devices = topology_devices(slice_name)
    return evaluate(calibration_config(len(devices), depth, **shape), chip, devices, progress,
                    build=lm_programs)[0]


def row(r: Result, measured: float = MAXTEXT["mfu"]) -> str:
    """One line of the table in docs/planning.md: predicted bounds against the measurement."""
    pct = lambda x: "-" if x is None else f"{100 * x:.1f}%"
    ms = lambda x: "-" if x is None else f"{1e3 * x:.0f}"
    return (f"| {r.program} | {r.total / 2**30:.2f} GiB | {ms(r.step_overlap_s)}.."
            f"{ms(r.step_no_overlap_s)} ms | {ms(r.collective_s)} ms | {pct(r.mfu_ceiling)} | "
            f"{pct(r.mfu_no_overlap)} | {pct(measured)} (MaxText) |")
