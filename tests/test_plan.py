"""fr_jax.plan on this CPU machine: the real-family programs compiled by the TPU compiler for
a v5e-8 slice at reduced depth (2 layers; real widths, vocabularies, sequence length).

What is asserted is what the compiler reports: that the configured programs fit, that
activation memory scales with the micro-batch and the sequence, and that rematerialisation
and blocked losses save what they are predicted to save.
"""

import functools
import json
import re
import runpy

import pytest

from fr_jax import plan as plan_cli
from fr_jax import aot as plan
from fr_jax.config import default_config_file
from fr_jax.runtime.bundle import bundled_world

SLICE = "v5e-8"
DEPTH = 2


def _config(family="llama3", **overrides):
    c = runpy.run_path(default_config_file(f"{family}.py"))["get_config"]()
    c.plan.depth = DEPTH
    for path, value in overrides.items():
        node = c
        *parents, leaf = path.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


@functools.lru_cache(maxsize=None)
def _devices():
    return plan.topology_devices(SLICE)


# The activation test's models: Llama-3 layers at half the 1B router's width and a quarter of
# its vocabulary. What it checks is how temporaries respond to rows, tokens, remat, blocked
# losses and the fused kernel -- formulas in the model's own sizes -- and at this width its
# six compiles take about half as long (the real widths are the CLI tests' business). Not
# narrower: at width 512 XLA's schedule for 2 rows a chip held 2.7x the temporaries of 1 row.
NARROW = dict(hidden_size=1024, intermediate_size=4096, num_heads=16, num_kv_heads=2,
              head_dim=64, vocab_size=32768)


@functools.lru_cache(maxsize=None)
def _sft_step(rows: int, seq: int, remat: str, block: int, attention: str = "xla"):
    """Per-chip temporaries and total of the SFT step (signals precomputed) with `rows`
    rows per micro-batch of `seq` tokens."""
    from fr_jax.runtime import sharding as sh

    c = _config(**{"train.batch_size": rows * 2, "train.grad_accum": 2, "data.seq_len": seq,
                   "model.remat": remat, "train.loss_block": block,
                   "model.attention": attention})
    chip, devices = _devices()
    mesh = sh.make_mesh({a: int(c.mesh[a]) for a in sh.MESH_AXES}, devices)
    rcfg = plan.model_config("", c.plan.router_arch, c.model.dtype, c.model.param_dtype, "router")
    ecfg = plan.model_config("", c.plan.expert_arch, c.model.dtype, "bfloat16", "expert")
    cut = lambda m: m.replace(num_layers=DEPTH, layer_types=m.layer_types[:DEPTH], **NARROW)
    rcfg = cut(rcfg)
    progs = plan.train_programs(c, rcfg, [cut(ecfg)] * 3, mesh, ("sft",))
    step = [p for p in progs if p.name == "SFT step"][0]
    compiled, err = plan.compile_program(step)
    assert compiled is not None, err
    ma = compiled.memory_analysis()
    return ma.temp_size_in_bytes, rcfg, len(devices)


@pytest.mark.slow
def test_plan_cli_reduced_depth_fits_and_reports(tmp_path, capsys):
    """The CLI on configs/llama3.py for v5e-8 at depth 2: every program (expert signals, SFT,
    CDPO, lazy decode at batch 1) fits with 10% headroom -> exit status 0, and the table and
    the JSON say so program by program. (Left out here, six more TPU compiles at real
    widths: the evaluation steps and the sample decode, which tests/test_residency.py plans
    on the CPU backend, and the eager decode, which the next test compiles for small
    models.)"""
    out = tmp_path / "plan.json"
    code = plan_cli.main(["--config=" + default_config_file("llama3.py"), f"--topology={SLICE}",
                      f"--config.plan.depth={DEPTH}", "--config.plan.decode_batches=(1,)",
                      "--config.plan.lazy=(True,)",
                      "--config.plan.costs=False", "--config.train.eval_every=0",
                      "--config.train.sample_every=0", f"--json={out}"])
    text = capsys.readouterr().out
    assert code == 0, text
    results = json.loads(out.read_text())["results"]
    names = [r["program"] for r in results]
    assert {"expert signals (precompute)", "SFT step", "CDPO step"} <= set(names)
    assert any("decode chunk, fusionroute lazy, batch 1" in n for n in names)
    for r in results:
        assert r["fits"] and 0 < r["total"] <= 0.9 * r["usable"], r
    assert "| SFT step |" in text and "15.75 GiB usable" in text
    assert "| step ms (overlap..no overlap) | MFU ceiling..no overlap |" in text
    assert all(r["step_overlap_s"] is None and r["mfu_ceiling"] is None for r in results)


@pytest.mark.slow
def test_plan_cli_plans_several_slices_in_one_run(tmp_path, capsys):
    """--topology=a,b plans each slice (docs/planning.md's tables come from one command); an
    unknown slice anywhere in the list is refused before anything is compiled. The lineup
    is the bundled world's checkpoints (their config.json sets the shapes, as a user's
    local checkpoints do): what is tested is the slices, so the programs are small (the
    eager and the lazy decode, the server's prefill, insert and chunk, each compiled for the
    TPU here)."""
    world = bundled_world()
    base = ["--config=" + default_config_file("llama3.py"),
            f"--config.router.path={world['router_base']}",
            f"--config.experts.paths={tuple(world['experts'])!r}",
            "--config.plan.programs=('decode', 'serve')", "--config.plan.decode_batches=(1,)",
            "--config.plan.costs=False", "--config.serve.slots=4", "--config.serve.buckets=(16,)"]
    with pytest.raises(SystemExit, match="unknown TPU slice 'v9-1'.*v5e-8"):
        plan_cli.main(base + ["--topology=v5e-8,v9-1"])
    out = tmp_path / "plan.json"
    code = plan_cli.main(base + ["--topology=v5e-8,v4-8", f"--json={out}"])
    text = capsys.readouterr().out
    assert code == 0, text
    slices = json.loads(out.read_text())["slices"]
    assert [s["slice"] for s in slices] == ["v5e-8", "v4-8"]
    for s in slices:
        assert {r["program"] for r in s["results"]} == {
            f"decode {p}, fusionroute {m}, batch 1, {at}" for m in ("eager", "lazy")
            for p, at in (("prefill", "prompt 1024"), ("chunk", "cache 2048"))} | {
            "serve prefill, bucket 16, fusionroute lazy", "serve insert, fusionroute lazy",
            "serve chunk, fusionroute lazy, 4 slots, cache 2048"}  # the server's programs
        chunk = next(r for r in s["results"] if r["program"].startswith("serve chunk"))
        assert chunk["parts"]["caches"] > 0 and chunk["fits"]
        # the checkpoints' own shapes (a few MiB), not the llama-3 presets' (GiBs)
        assert all(r["total"] < 2**28 for r in s["results"]), s["results"]
    assert "## v5e-8" in text and "## v4-8" in text and "30.75 GiB usable" in text


@pytest.mark.slow
def test_a_program_that_does_not_fit_names_its_largest_buffers_and_the_fix(capsys):
    """Whole-sequence logits, no remat, einsum attention and a 64-row micro-batch (8 rows a
    chip): the SFT step OOMs on v5e; exit status 1, the float32 attention scores among the
    largest buffers, and the fields to change."""
    code = plan_cli.main(["--config=" + default_config_file("llama3.py"), f"--topology={SLICE}",
                      f"--config.plan.depth={DEPTH}", "--config.plan.programs=('train',)",
                      "--config.train.stages=('sft',)", "--config.train.sft.expert_signals=online",
                      "--config.train.batch_size=64", "--config.train.grad_accum=1",
                      "--config.model.remat=none", "--config.train.loss_block=0",
                      "--config.model.attention=xla",
                      "--config.plan.costs=False"])
    text = capsys.readouterr().out
    assert code == 1
    assert "| SFT step |" in text and "**NO**" in text
    # the attention scores every layer keeps for the backward pass: [.., 2048, 2048] float32
    assert "largest buffers" in text and re.search(r"f32\[[\d,]*2048,2048\]", text)
    assert "--config.train.grad_accum" in text and "--config.model.remat=full" in text


@pytest.mark.slow
def test_activation_memory_and_what_remat_blocked_losses_and_fused_attention_save():
    """One test, so the six compiles share the base program (8 rows of 1024 tokens, remat
    full, blocks of 512) instead of compiling it on each worker."""
    rows, seq, block = 8, 1024, 512
    base, rcfg, chips = _sft_step(rows, seq, "full", block)

    # Activations scale with the micro-batch and the sequence. Temporaries are activations
    # plus the gathered weights and float32 gradient buffers, which do not depend on rows or
    # tokens. Doubling the rows adds at least 0.3x the base and at most doubles it (measured:
    # 1.58x). Doubling the sequence makes it grow, by at most 4x (attention is quadratic;
    # measured: 3.0x at this width, where activations outweigh the weights; 1.08x at the
    # router's real width).
    rows2, _, _ = _sft_step(2 * rows, seq, "full", block)
    seq2, _, _ = _sft_step(rows, 2 * seq, "full", block)
    assert 1.3 * base < rows2 <= 2.1 * base
    assert base < seq2 <= 4.2 * base

    none, _, _ = _sft_step(rows, seq, "none", block)
    whole, _, _ = _sft_step(rows, seq, "full", 0)
    rows_per_chip = rows // chips  # the mesh is FSDP over the 8 chips
    # Blocked losses: whole-sequence float32 logits [rows, T, V] per chip no longer exist;
    # only a [rows, block, V] block does.
    logits = rows_per_chip * (seq - block) * rcfg.vocab_size * 4
    assert whole - base >= 0.9 * logits
    # Remat full keeps each layer's input only; without it the backward holds the other
    # layer's attention probabilities ([rows, heads, T, T], at least bf16) and MLP activations.
    probs = rows_per_chip * rcfg.num_heads * seq * seq * 2
    assert none - base >= 0.9 * probs
    # The fused kernel (what model.attention=auto runs on TPU) keeps no probabilities.
    fused, _, _ = _sft_step(rows, seq, "none", block, "auto")
    assert none - fused >= 0.9 * probs


@pytest.mark.slow
def test_collectives_time_bounds_and_the_calibration_program_on_cpu():
    """Stage lm's step (fr_jax.aot.calibration) for the bundled toy router on the
    8-device CPU mesh, timed as if on v6e chips: FSDP makes all-gathers and reduce-scatters
    every step; the no-overlap step is the full-overlap one plus their time; the table shows
    the bounds and ceilings under their own names. (The real-size row: docs/planning.md.)"""
    import jax

    from fr_jax.aot.calibration import calibration_config, lm_programs, row

    c = calibration_config(8, seq_len=128, rows_per_chip=1)
    c.router.path = bundled_world()["router_base"]
    chip = plan.CHIPS["v6e"]
    r, = plan.evaluate(c, chip, jax.devices()[:8], progress=False, build=lm_programs)
    assert r.program == "LM step (calibration)" and r.flops > 0 and r.hbm_bytes > 0
    assert r.collectives["all-gather"]["count"] >= 1, r.collectives
    assert r.collective_s == pytest.approx(sum(
        k["wire"] for k in r.collectives.values()) / chip.ici_send_bw)
    assert r.step_no_overlap_s == pytest.approx(
        max(r.flops / chip.peak_flops, r.hbm_bytes / chip.hbm_bw) + r.collective_s)
    assert r.step_overlap_s < r.step_no_overlap_s
    assert 0 < r.mfu_no_overlap < r.mfu_ceiling and r.roofline_ceiling is None
    text = plan.table([r], "cpu", chip)
    for column in ("collectives ms/step (count)", "step ms (overlap..no overlap)",
                   "MFU ceiling..no overlap", "roofline ceiling..no overlap"):
        assert column in text
    assert re.search(r"\| \d+\.\d+ \(\d+\) \| [\d.]+\.\.[\d.]+ \| \d+%\.\.\d+% \| - \|", text)
    assert "45.5% (MaxText)" in row(r)


def test_a_multi_host_launch_plans_each_stage_s_export_beside_what_stays():
    """A launch of several processes gathers each stage's trained router to every process
    to export it, a leaf at a time (`distributed.fetch`): the plan compiles the largest
    leaf's gather, with the rest of the router, and CDPO's experts (its steps took them),
    resident beside it. One process has no such program."""
    import jax
    import numpy as np

    from fr_jax.runtime import sharding as sh

    world = bundled_world()
    c = _config(**{"train.sample_every": 0, "train.eval_every": 0})
    c.plan.depth = 0
    mesh = sh.make_mesh({a: int(c.mesh[a]) for a in sh.MESH_AXES}, jax.devices()[:8])
    rcfg = plan.model_config(world["router_base"], "", "float32", "float32", "router")
    ecfgs = [plan.model_config(p, "", "float32", "float32", "expert") for p in world["experts"]]
    one = plan.train_programs(c, rcfg, ecfgs, mesh, ("sft", "cdpo"))
    two = plan.train_programs(c, rcfg, ecfgs, mesh, ("sft", "cdpo"), hosts=2)
    assert not [p for p in one if "export" in p.name]
    exports = {p.name: p for p in two if "export" in p.name}
    assert set(exports) == {"SFT export (router gathered, largest tensor)",
                            "CDPO export (router gathered, largest tensor)"}
    nbytes = lambda t: sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(t))
    router = nbytes([p for p in two if p.name == "SFT step"][0].groups["params"])
    experts = nbytes([p for p in two if p.name == "CDPO step"][0].groups["frozen"]["experts"])
    for name, beside in (("SFT", router), ("CDPO", router + experts)):
        p = exports[f"{name} export (router gathered, largest tensor)"]
        assert nbytes(p.args) + nbytes(p.resident) == beside, name
        compiled, err = plan.compile_program(p)
        assert compiled is not None, err
        # the gathered leaf is whole on each device
        assert compiled.memory_analysis().output_size_in_bytes == nbytes(p.args)


@pytest.mark.slow
def test_the_speculative_step_is_planned_per_accepted_token(tmp_path):
    """decode.speculate=4 adds the speculative step (router k + 1 times, the selected expert
    one chunk) for configs/llama3.py on v5e-8 at depth 2: it fits, and at 70% of drafts kept
    (3.8 tokens a step) the HBM bytes the compiler's program reads per token are about half
    the lazy chunk's (the router is a quarter of the expert's bytes per token here)."""
    out = tmp_path / "plan.json"
    code = plan_cli.main(["--config=" + default_config_file("llama3.py"), f"--topology={SLICE}",
                          f"--config.plan.depth={DEPTH}", "--config.plan.decode_batches=(1,)",
                          "--config.plan.lazy=(True,)", "--config.plan.programs=('decode',)",
                          "--config.decode.speculate=4", "--config.plan.acceptance=0.7",
                          f"--json={out}"])
    assert code == 0
    results = {r["program"]: r for r in json.loads(out.read_text())["results"]}
    spec = results["decode speculative step, fusionroute lazy k=4 (70% of drafts kept: 3.80 "
                   "tokens), batch 1, cache 2048"]
    lazy = results["decode chunk, fusionroute lazy, batch 1, cache 2048"]
    assert spec["fits"] and lazy["fits"]
    assert 0.3 < spec["hbm_bytes"] / lazy["hbm_bytes"] < 0.7, (spec["hbm_bytes"],
                                                                 lazy["hbm_bytes"])


def test_the_speculative_servers_chunk_is_planned_per_accepted_token():
    """decode.speculate=2 with the serve programs: the server's chunk is the speculative
    engine's (decode.chunk speculative steps of serve.slots rows), its run counting
    chunk x (1 + plan.acceptance x k) tokens; every program compiles (here for the CPU, with
    tiny models: what is checked is the program list, not a slice)."""
    import jax
    from fixtures import tiny
    from fr_jax.runtime import sharding as sh

    c = _config(**{"decode.speculate": 2, "plan.acceptance": 0.5, "decode.chunk": 3,
                   "serve.slots": 2, "serve.cache_len": 64, "serve.buckets": (16,)})
    mesh = sh.make_mesh({}, jax.devices()[:1])
    progs = plan.serve_programs(c, tiny("llama"), [tiny("llama")] * 3, mesh)
    chunk = next(p for p in progs if p.name.startswith("serve chunk"))
    assert chunk.name == ("serve chunk, fusionroute lazy k=2 (50% of drafts kept), 2 slots, "
                          "cache 64") and chunk.steps == 3 * (1 + 0.5 * 2), chunk.name
    assert {p.name for p in progs} - {chunk.name} == {
        "serve prefill, bucket 16, fusionroute lazy k=2", "serve insert, fusionroute lazy k=2"}
    for p in progs:
        compiled, err = plan.compile_program(p)
        assert compiled is not None, (p.name, err)
