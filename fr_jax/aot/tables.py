"""The plan's table, and what to change for a program that does not fit."""

from __future__ import annotations

import math
from typing import List, Sequence, Tuple

from fr_jax.aot.compile import Result, evaluate
from fr_jax.runtime.hardware import Chip, GiB, slice_size, topology_devices


# ---------------------------------------------------------------------------- reporting
def _gib(x):
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x / GiB:.2f}"


def _span(lo, hi, fmt) -> str:
    """`lo..hi` of two bounds ("-" where there are none)."""
    return "-" if lo is None else f"{fmt(lo)}..{fmt(hi)}"


def _pct(x) -> str:
    return f"{100 * x:.0f}%"


def _collectives(r: Result) -> str:
    if r.collective_s is None:
        return "-"
    count = sum(c["count"] for c in r.collectives.values())
    return f"{r.collective_s * 1e3:.2f} ({count:.0f})"


def table(results: Sequence[Result], slice_name: str, chip: Chip) -> str:
    head = (f"Per chip on {slice_name} ({chip.name}, {chip.usable_gib} GiB usable HBM, "
            f"{chip.peak_flops / 1e12:.0f} TFLOP/s bf16, {chip.hbm_bw / 1e9:.0f} GB/s HBM, "
            f"{chip.ici_bw / 1e9:.0f} GB/s ICI both ways). Step times are bounds: full "
            "overlap of compute, memory and collectives .. none; MFU and roofline share at "
            "each, ceilings, not forecasts (docs/planning.md)")
    rows = ["| program | params | optimizer | frozen | caches | resident | temporaries "
            "| total GiB "
            "| HBM used | fits | TFLOPs/step | HBM GB/step | collectives ms/step (count) "
            "| step ms (overlap..no overlap) | MFU ceiling..no overlap "
            "| roofline ceiling..no overlap |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        p = r.parts
        rows.append(
            f"| {r.program} | {_gib(p.get('params'))} | {_gib(p.get('optimizer'))} | "
            f"{_gib(p.get('frozen'))} | {_gib(p.get('caches'))} | {_gib(p.get('resident'))} | "
            f"{_gib(p.get('temporaries'))} | "
            f"{_gib(r.total)} | {100 * r.total / r.usable:.0f}% | "
            f"{'yes' if r.fits else '**NO**'} | "
            f"{'-' if r.flops is None else f'{r.flops / 1e12:.2f}'} | "
            f"{'-' if r.hbm_bytes is None else f'{r.hbm_bytes / 1e9:.2f}'} | "
            f"{_collectives(r)} | "
            f"{_span(r.step_overlap_s, r.step_no_overlap_s, lambda t: f'{t * 1e3:.1f}')} | "
            f"{_span(r.mfu_ceiling, r.mfu_no_overlap, _pct)} | "
            f"{_span(r.roofline_ceiling, r.roofline_no_overlap, _pct)} |")
    return head + "\n\n" + "\n".join(rows)


def advice(r: Result, config) -> str:
    """What to change when a program does not fit."""
    lines = [f"{r.program}: needs {_gib(r.total)} GiB of {r.usable / GiB:.2f} GiB per chip"
             + (f" ({r.error})" if r.error else "")]
    if r.largest:
        lines.append("  largest buffers:")
        lines += ["    " + b for b in r.largest]
    if r.kind == "train":
        tc = config.train
        lines.append(
            "  to fit: raise --config.train.grad_accum (micro-batch now "
            f"{tc.batch_size // max(tc.grad_accum, 1)} rows), set --config.model.remat=full "
            f"(now {config.model.remat}), a --config.train.loss_block of 256-1024 (now "
            f"{tc.loss_block}), a shorter --config.data.seq_len, or a larger slice "
            "(--topology) with the mesh's fsdp axis over all chips")
    else:
        lines.append("  to fit: lower the decode batch (--config.plan.decode_batches), the cache "
                     "(--config.plan.cache_len), use lazy experts, or a larger slice with a "
                     "larger tensor axis (--config.mesh.tensor)")
    return "\n".join(lines)


def plan_slice(config, slice_name: str, progress: bool = True) -> Tuple[List[Result], str]:
    """Compiles every program of `config` for the slice -> (results, the report to print)."""
    chip, devices = topology_devices(slice_name)
    results = evaluate(config, chip, devices, progress, hosts=slice_size(slice_name)[1])
    report = table(results, slice_name, chip)
    bad = [r for r in results if not r.fits]
    if bad:
        report += "\n\nDoes not fit (with {:.0%} headroom):\n".format(config.plan.headroom)
        report += "\n".join(advice(r, config) for r in bad)
    return results, report
