"""What a real training run keeps on its devices (issue 32): a tiny SFT-then-CDPO run with
precomputed expert signals and reference, evaluation and sample decodes, on the 8-device
CPU mesh. At each phase's first program call the device buffers alive are exactly the
program's arguments plus what `residency.resident` says stays beside them: the experts
leave the devices once their signals are computed, one router copy is alive, the reference
router only while its log-probs are computed, a sample decode's copies only while it
runs."""

import os

import jax
import pytest

from fr_jax.runtime.bundle import bundled_world
from fr_jax.steps import residency

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _device_bytes(leaves) -> int:
    """Bytes of distinct buffers on device 0 in device memory. A shard's view (what
    `addressable_shards` hands out, kept alive by the array it came from) shares its
    parent's buffer, so buffers are told apart by their address."""
    dev = jax.devices()[0]
    seen, total = set(), 0
    for x in leaves:
        if not isinstance(x, jax.Array) or x.is_deleted() or (
                x.sharding.memory_kind not in (None, "device")):
            continue
        for shard in x.addressable_shards:
            if shard.device == dev:
                ptr = shard.data.unsafe_buffer_pointer()
                if ptr not in seen:
                    seen.add(ptr)
                    total += shard.data.nbytes
    return total


def _pref_file(root, sft_file):
    """Preference pairs from the SFT file's own records: response vs another response."""
    import json
    lines = [json.loads(x) for x in open(sft_file)]
    path = root / "pref.jsonl"
    with open(path, "w") as f:
        for a, b in zip(lines[::2], lines[1::2]):
            f.write(json.dumps({"prompt": a["prompt"], "chosen": a["response"],
                                "rejected": b["response"]}) + "\n")
    return path


@pytest.mark.slow
@pytest.mark.parametrize("sft_weight", [0.0, 0.5])  # 0.5: CDPO's step takes SFT rows too
def test_each_phase_holds_its_arguments_and_what_residency_names_and_the_plan_predicts_it(
        tmp_path, sft_file, sft_weight):
    from fr_jax.cli import parse_flags
    from fr_jax.loop import train

    world = bundled_world()
    fv = parse_flags(["t", "--config=" + os.path.join(REPO, "configs", "tiny.py")],
                     os.path.join(REPO, "configs", "tiny.py"))
    config = fv.config
    with config.unlocked():
        config.router.path, config.experts.paths = world["router_base"], tuple(world["experts"])
        config.data.sft_path, config.data.pref_path = str(sft_file), str(
            _pref_file(tmp_path, sft_file))
        config.train.workdir = str(tmp_path / "run")
        config.train.stages = ("sft", "cdpo")
        config.train.sft.steps = config.train.cdpo.steps = 2
        config.train.sft.expert_signals = "precompute"
        config.train.cdpo.reference = "precompute"
        config.train.cdpo.sft_weight = sft_weight
        config.train.eval_every, config.train.sample_every = 2, 2
        config.train.ckpt_every, config.train.log_every = 2, 1
    seen, running, batches = {}, {}, {}

    def observe(stage, phase, program, args):
        given = _device_bytes(jax.tree.leaves(args))
        seen[(stage, phase)] = (_device_bytes(jax.live_arrays()), given)
        if phase in ("step", "eval"):  # (state or params, frozen, batch)
            batches[(stage, phase)] = _device_bytes(jax.tree.leaves(args[2]))
        ma = program.lower(*args).compile().memory_analysis()
        # What the program adds while it runs: its arguments not yet made (a sample
        # decode's caches and prompts: abstract here), outputs not written over donated
        # inputs, temporaries, code.
        running[(stage, phase)] = (ma.argument_size_in_bytes - given + ma.output_size_in_bytes
                                   - ma.alias_size_in_bytes + ma.temp_size_in_bytes
                                   + ma.generated_code_size_in_bytes)

    train(config, progress=False, observe=observe)
    assert set(seen) == {("sft", "signals"), ("sft", "step"), ("sft", "eval"),
                         ("sft", "sample"), ("cdpo", "reference"), ("cdpo", "step"),
                         ("cdpo", "eval"), ("cdpo", "sample")}
    live = {k: v[0] for k, v in seen.items()}
    extra = {k: v[0] - v[1] for k, v in seen.items()}
    # A step's arguments are everything alive: no experts in SFT (their signals are
    # precomputed), no second router copy, no reference in CDPO (precomputed too).
    # (Up to 1 KiB of scalars other tests of this worker left alive: a router copy is 0.9 MB.)
    assert extra[("sft", "step")] <= 1024 and extra[("cdpo", "step")] <= 1024, seen
    # Evaluation runs beside the train state: the same buffers as the step, their batches
    # aside (CDPO's step batch also holds SFT rows with train.cdpo.sft_weight).
    for stage in ("sft", "cdpo"):
        assert abs((live[(stage, "eval")] - batches[(stage, "eval")])
                   - (live[(stage, "step")] - batches[(stage, "step")])) <= 1024, (stage, seen)
    # The precomputes run beside the stage's incoming router (one copy of its params: half
    # the optimizer state that evaluation sees beside its arguments, Adam's mu and nu).
    router = extra[("sft", "eval")] / 2
    for phase in (("sft", "signals"), ("cdpo", "reference")):
        assert abs(extra[phase] - router) <= 0.01 * router, (phase, seen)
    # A sample decode runs on copies of the router and the experts in the decoding layout
    # (its arguments, the experts brought from host memory), beside the whole train state:
    # params, Adam's mu and nu. In CDPO the step's experts left for host memory first.
    for stage in ("sft", "cdpo"):
        assert abs(extra[(stage, "sample")] - 3 * router) <= 0.01 * router + 1024, seen
    # The table the plan reads says the same.
    assert residency.resident("sft", config) == {
        "signals": {"router", "experts"}, "step": {"state"}, "eval": {"state"},
        "sample": {"state", "sampler"}, "export": {"router"}}
    assert residency.resident("cdpo", config) == {
        "reference": {"router", "experts", "ref"}, "step": {"state", "experts"},
        "eval": {"state", "experts"}, "sample": {"state", "sampler"},
        "export": {"router", "experts"}}

    # The plan for the same config on the same mesh (this CPU backend) predicts each
    # stage's peak per device, resident buffers included.
    from fr_jax.aot import Chip, evaluate

    with config.unlocked():
        config.plan.programs, config.plan.costs = ("train",), False
    results = {r.program: r for r in evaluate(
        config, Chip("cpu", 1024, 1024, 1e12, 1e11, 1e10), jax.devices(), progress=False)}
    names = {("sft", "signals"): "expert signals (precompute)", ("sft", "step"): "SFT step",
             ("sft", "eval"): "SFT eval", ("cdpo", "reference"): "CDPO reference (precompute)",
             ("cdpo", "step"): "CDPO step", ("cdpo", "eval"): "CDPO eval"}
    sample = next(n for n in results if n.startswith("sample decode prefill"))
    names.update({("sft", "sample"): sample, ("cdpo", "sample"): sample})
    for k, name in names.items():  # program by program, to the compiler's rounding
        assert abs(results[name].total - (live[k] + running[k])) <= 0.01 * results[name].total, (
            name, results[name].total, live[k] + running[k])
    for stage in ("sft", "cdpo"):  # the measure: each stage's peak within 10%
        real = max(live[k] + running[k] for k in names if k[0] == stage)
        plan = max(results[names[k]].total for k in names if k[0] == stage)
        assert abs(plan - real) <= 0.1 * real, (stage, plan, real)
