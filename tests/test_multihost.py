"""fr_jax as several JAX processes on this machine (tests/launcher.py), compared with one
process holding all the devices: the launcher itself, the collectives fr_jax relies on,
and training (SFT with precomputed expert signals, CDPO with the experts in the step,
stage lm) giving the same losses, params and optimizer state as 2 x 4 devices as it does
as 1 x 8, with every file written once.

Tolerance: the two runs compile the same SPMD program for the same 8-device mesh, but a
reduction across processes goes through gloo, which adds its partial sums in another
order than XLA's in-process all-reduce. Float32 sums of the same terms in another order
differ by a few ulps (measured: losses by <= 2e-6 at ~15, params by <= 2e-7 after Adam
steps), so losses are compared to rtol 1e-5 and params / optimizer state to atol 1e-5.
"""

import json
import os
import time

import jax
import numpy as np
import pytest
from tb_events import read_events

from cli_env import REPO
from launcher import LaunchError, run_processes

TINY = os.path.join(REPO, "configs", "tiny.py")


def test_the_launcher_kills_every_process_when_one_fails(tmp_path):
    script = ("import os, sys, time\n"
              "if os.environ['JAX_PROCESS_ID'] == '1':\n"
              "    print('process 1 gives up'); sys.exit(3)\n"
              "time.sleep(600)\n")
    started = []  # when the launch began (it may first wait for another launch to end)
    with pytest.raises(LaunchError) as err:
        run_processes(2, ["-c", script], tmp_path, devices=1, timeout=120,
                      on_start=lambda procs: started.append(time.monotonic()))
    assert time.monotonic() - started[0] < 60  # process 0 did not run out its sleep
    msg = str(err.value)
    assert "2-process launch failed" in msg and "--- process 1 (rc 3):" in msg
    assert "process 1 gives up" in msg and "--- process 0 (rc -9)" in msg
    runs = run_processes(2, ["-c", "import time; time.sleep(600)"], tmp_path / "slow",
                         devices=1, timeout=3, check=False)
    assert [r.returncode for r in runs] == [-9, -9]  # the hard timeout kills them all


COLLECTIVES = """
import jax, numpy as np
from fr_jax.runtime import distributed
from fr_jax.runtime.sharding import NamedSharding, P
assert distributed.initialize() and jax.process_count() == 2 and jax.device_count() == 4
mesh = jax.make_mesh((4,), ("data",))
x = np.arange(8.0).reshape(4, 2)
g = distributed.to_global(x, NamedSharding(mesh, P("data")))
total = jax.jit(lambda a: a.sum())(g)
gathered = distributed.fetch(g * 2)
agree = distributed.all_agree(jax.process_index() == 0)
distributed.barrier("done")
print("RESULT", jax.process_index(), float(total), gathered.tolist(), agree, flush=True)
"""


def test_two_processes_form_one_program(tmp_path):
    runs = run_processes(2, ["-c", COLLECTIVES], tmp_path, devices=2, timeout=300)
    for r in runs:
        line = [x for x in r.log.splitlines() if x.startswith("RESULT")]
        assert line == [f"RESULT {r.rank} 28.0 {(np.arange(8.0).reshape(4, 2) * 2).tolist()} "
                        "False"], r.log[-2000:]


# ------------------------------------------------------------------------------ training
def _read_state(path):
    """An Orbax state saved on any mesh, read whole onto this process's first device."""
    import orbax.checkpoint as ocp

    ckptr = ocp.StandardCheckpointer()
    meta = ckptr.metadata(path)
    meta = getattr(meta, "item_metadata", meta)
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=dev), meta)
    return ckptr.restore(path, target)


def _assert_same_state(a_dir, b_dir, step):
    a, b = (_read_state(os.path.join(d, str(step), "state")) for d in (a_dir, b_dir))
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y, np.float64),
                                   rtol=0, atol=1e-5, err_msg=jax.tree_util.keystr(path))


def _assert_same_history(a, b):
    ha, hb = (json.load(open(x)) for x in (a, b))
    assert [h["micro"] for h in ha] == [h["micro"] for h in hb]
    for x, y in zip(ha, hb):
        for k in ("loss", "grad_norm"):
            np.testing.assert_allclose(y[k], x[k], rtol=1e-5, err_msg=(k, x["micro"]))


def _sft_file(tmp_path, n=200):
    """A small SFT file of the toy world's four domains (the bundled one has 4,000): the precompute stays short."""
    from fr_jax.harness import toy_world as W

    path = tmp_path / "sft.jsonl"
    data = W.make_world_data(200, 4, 3)
    W.write_jsonl(str(path), [t.record() for t in W.mixture(
        data.train, {d: 1.0 for d in W.EVAL_DOMAINS}, n, 3)])
    return path


def _train_args(tmp_path, *extra):
    """The training command line; a field in `extra` replaces the default given here (a
    field given twice is refused)."""
    given = {a.split("=", 1)[0] for a in extra}
    base = ["--config.train.log_every=1", "--config.train.eval_every=0",
            "--config.train.sample_every=0", "--config.train.ckpt_every=2",
            "--config.train.batch_size=8", f"--config.data.sft_path={_sft_file(tmp_path)}"]
    return ["-m", "fr_jax.train", f"--config={TINY}",
            *[a for a in base if a.split("=", 1)[0] not in given], *extra]


FSDP_TENSOR = ["--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=2"]


def _train_both(tmp_path, extra):
    """The same run as 1 x 8 and 2 x 4 devices. The two processes read their own halves of
    the file (one data stream per host, the default); the single process is given the
    same two streams (data.streams), so both see the same batches."""
    common = _train_args(tmp_path, *FSDP_TENSOR, *extra)
    home = tmp_path / "home"
    one = run_processes(1, common + [f"--config.train.workdir={tmp_path / 'one'}",
                                     "--config.data.streams=2"],
                        tmp_path / "log1", devices=8, home=home, timeout=900)
    two = run_processes(2, common + [f"--config.train.workdir={tmp_path / 'two'}"],
                        tmp_path / "log2", devices=4, home=home, timeout=900)
    return one, two


def _events(folder):
    return [f for f in os.listdir(folder) if f.startswith("events.out.tfevents")]


@pytest.mark.slow
def test_router_training_as_two_processes_equals_one_process(tmp_path):
    """SFT with precomputed expert signals (every process computes them as one program and
    keeps them; process 0 writes the cache; nobody waits on the file), then CDPO with the
    experts and the reference router in the step; FSDP and tensor axes span both
    processes, so params, gradients and Adam state are split between them."""
    from safetensors.numpy import load_file

    one, two = _train_both(tmp_path, ["--config.train.sft.steps=4",
                                      "--config.train.cdpo.steps=2",
                                      "--config.train.cdpo.reference=online",
                                      "--config.train.eval_every=2",
                                      "--config.train.sample_every=4"])
    for stage, last in (("sft", 4), ("cdpo", 2)):
        a, b = tmp_path / "one" / stage, tmp_path / "two" / stage
        _assert_same_history(a / "history.json", b / "history.json")
        _assert_same_state(a / "checkpoints", b / "checkpoints", last)
        for f in ("model.safetensors", "routing_head.safetensors"):
            x, y = load_file(a / "router" / f), load_file(b / "router" / f)
            assert x.keys() == y.keys()
            for k in x:
                np.testing.assert_allclose(y[k], x[k], rtol=0, atol=1e-5, err_msg=(stage, k))
        assert len(_events(tmp_path / "two" / "tensorboard" / stage)) == 1
        # The sample decode ran on both processes as one program: the same text as one
        # process wrote (process 0's prompts in both runs: data stream 0's).
        texts = [read_events(tmp_path / run / "tensorboard" / stage)["text"]["samples"]
                 for run in ("one", "two")]
        assert texts[0] == texts[1] and texts[0][-1][0] == last and texts[0][-1][1].strip()
    # Each process read and tokenized its own stream (half the file), computed its
    # examples' signals on its own devices and wrote its stream's cache.
    n = {}
    for r in two:
        line = [x for x in r.log.splitlines() if x.startswith(f"[sft] process {r.rank} reads")]
        assert line and f"data streams [{r.rank}] of 2" in line[0], r.log[-2000:]
        n[r.rank] = int(line[0].split(": ")[1].split(" of ")[0])
        assert line[0].endswith(" of 200 records")
        assert (tmp_path / "two" / "sft" / f"expert_signals.stream{r.rank}of2.npz").is_file()
    assert n[0] + n[1] == 200 and abs(n[0] - n[1]) <= 1
    reports = [json.load(open(tmp_path / run / "sft" / "data_report.json"))
               for run in ("one", "two")]
    assert reports[0] == reports[1] and reports[0]["kept"] > 150  # the whole file's, once
    # What a person reads comes from process 0 alone: no progress bar, no export line and no
    # data report from process 1.
    log0, log1 = two[0].log, two[1].log
    assert "[sft] exported router" in log0 and "[cdpo] exported router" in log0
    for line in ("exported router", "sft:", "cdpo:", "expert signals", "[sft] data"):
        assert line not in log1, line


@pytest.mark.slow
def test_stage_lm_as_two_processes_equals_one_process(tmp_path):
    from fr_jax.runtime.bundle import bundled_world
    from safetensors.numpy import load_file

    init = bundled_world()["experts"][0]
    _train_both(tmp_path, ["--config.train.stages=('lm',)", f"--config.train.lm.init={init}",
                           "--config.train.lm.steps=4"])
    a, b = tmp_path / "one" / "lm", tmp_path / "two" / "lm"
    _assert_same_history(a / "history.json", b / "history.json")
    _assert_same_state(a / "checkpoints", b / "checkpoints", 4)
    x, y = load_file(a / "model" / "model.safetensors"), load_file(b / "model" / "model.safetensors")
    for k in x:
        np.testing.assert_allclose(y[k], x[k], rtol=0, atol=1e-5, err_msg=k)


def _kill_when(procs, rank, ready, started):
    """A thread that SIGKILLs process `rank` as soon as `ready()` holds."""
    import signal
    import threading

    started.append(time.monotonic())  # the launch may have waited for another's end

    def watch():
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if ready():
                os.kill(procs[rank].pid, signal.SIGKILL)
                return
            time.sleep(0.002)
    threading.Thread(target=watch, daemon=True).start()


def _steps_in(ckpts):
    return sorted(int(f.name) for f in ckpts.iterdir() if f.name.isdigit()) \
        if ckpts.is_dir() else []


@pytest.mark.slow
def test_a_run_resumes_on_another_number_of_processes_where_it_stopped(tmp_path):
    """Against one uninterrupted run (1 x 8 devices, two data streams):
    2 -> 1: process 1 of a 2 x 4 run is SIGKILLed while both write step 4; process 0 stops
    with a line saying a process died (the save's error, fr_jax.runtime.distributed's watchdog or
    JAX's heartbeat check) instead of waiting in a collective forever; step 4 is never
    complete on disk; the same command as one process resumes from step 2.
    1 -> 2: a one-process run killed after a checkpoint resumes as two processes, each
    reading its own stream from the saved global position, and the finished run restores
    as 2 processes onto another mesh.
    Both end with the uninterrupted run's losses and state (to the cross-process tolerance
    of the module docstring)."""
    import signal

    # data=8: each process holds four rows' blocks. (A one-process 8-device run on the
    # fsdp x tensor mesh hung twice in 9 launches on this machine, inside XLA's in-process
    # CPU collectives, with device threads waiting at a rendezvous others never reached;
    # the other tests run that mesh in one process once each.)
    args = _train_args(tmp_path, "--config.mesh.data=8", "--config.train.stages=('sft',)",
                       "--config.train.sft.steps=8", "--config.data.streams=2")
    home = tmp_path / "home"
    ref = tmp_path / "ref"
    run_processes(1, args + [f"--config.train.workdir={ref}"], tmp_path / "log_ref",
                  devices=8, home=home, timeout=600)

    def same_as_ref(work):
        _assert_same_history(ref / "sft" / "history.json", work / "sft" / "history.json")
        _assert_same_state(ref / "sft" / "checkpoints", work / "sft" / "checkpoints", 8)

    # 2 -> 1
    work = tmp_path / "two_then_one"
    ckpts = work / "sft" / "checkpoints"
    started = []
    mid_save = lambda: ckpts.is_dir() and any(f.name.startswith("4.") and "tmp" in f.name
                                              for f in ckpts.iterdir())
    runs = run_processes(2, args + [f"--config.train.workdir={work}"], tmp_path / "log_kill",
                         devices=4, home=home, timeout=600, check=False,
                         stop_on_failure=False,
                         on_start=lambda procs: _kill_when(procs, 1, mid_save, started),
                         env={"FR_JAX_HEARTBEAT_TIMEOUT_S": "10"})
    assert runs[1].returncode == -signal.SIGKILL
    assert runs[0].returncode not in (0, None), runs[0].log[-3000:]  # failed, did not hang
    # Where process 0 was when its peer died decides who says so first.
    said = ("another process of this launch stopped during the save",
            "error: process 1 stopped answering", "another task died")
    assert any(x in runs[0].log for x in said), runs[0].log[-3000:]
    assert time.monotonic() - started[0] < 240
    assert _steps_in(ckpts) == [2]
    again = run_processes(1, args + [f"--config.train.workdir={work}"],
                          tmp_path / "log_again", devices=8, home=home, timeout=600)
    assert "[sft] resumed from step 2" in again[0].log
    same_as_ref(work)

    # 1 -> 2
    work = tmp_path / "one_then_two"
    ckpts = work / "sft" / "checkpoints"
    runs = run_processes(1, args + [f"--config.train.workdir={work}"], tmp_path / "log_one",
                         devices=8, home=home, timeout=600, check=False,
                         on_start=lambda procs: _kill_when(
                             procs, 0, lambda: bool(_steps_in(ckpts)), []))
    assert runs[0].returncode == -signal.SIGKILL, runs[0].log[-2000:]
    at = _steps_in(ckpts)[-1]
    assert at < 8
    again = run_processes(2, args + [f"--config.train.workdir={work}"],
                          tmp_path / "log_two", devices=4, home=home, timeout=600)
    assert f"[sft] resumed from step {at}" in again[0].log
    assert "reads data streams [1] of 2" in again[1].log
    same_as_ref(work)

    # The finished run restored as 2 processes onto another mesh (params and Adam state
    # now split over fsdp x tensor across the processes) exports the same router.
    import shutil

    from safetensors.numpy import load_file

    shutil.rmtree(work / "sft" / "router")  # written again, from the restored state
    # The first mesh's flag gives way to the new mesh's (a field given twice is refused).
    moved = [a for a in args if a != "--config.mesh.data=8"] + FSDP_TENSOR
    other = run_processes(2, moved + [f"--config.train.workdir={work}"],
                          tmp_path / "log_mesh", devices=4, home=home, timeout=600)
    assert "[sft] resumed from step 8" in other[0].log
    for f in ("model.safetensors", "routing_head.safetensors"):
        x, y = load_file(ref / "sft" / "router" / f), load_file(work / "sft" / "router" / f)
        for k in x:
            np.testing.assert_allclose(y[k], x[k], rtol=0, atol=1e-5, err_msg=k)


# ------------------------------------------------------------------------------ decoding
PROMPTS = ["add 37+8", "rev kqzt", "please caps mild", "twice rev kqzt", "wrap rot mild",
           "add 5+19", "caps rev mild", "rev add"]


@pytest.mark.slow
def test_fused_decoding_as_two_processes_gives_the_same_tokens(tmp_path):
    """Eight prompts, their rows split over an 8-device data axis that spans both
    processes; eager experts (the eval harness's test below decodes with lazy experts,
    the default); only process 0 prints and writes."""
    args = ["-m", "fr_jax.decode", *(f"--prompt={p}" for p in PROMPTS),
            "--config.decode.lazy_experts=False", "--config.decode.max_new_tokens=12"]
    home = tmp_path / "home"
    out = {}
    for n in (1, 2):
        runs = run_processes(n, args + [f"--output={tmp_path / f'{n}.jsonl'}"],
                             tmp_path / f"log{n}", devices=8 // n, home=home, timeout=600)
        out[n] = [json.loads(x) for x in open(tmp_path / f"{n}.jsonl")]
    assert [r["token_ids"] for r in out[2]] == [r["token_ids"] for r in out[1]]
    assert [r["experts"] for r in out[2]] == [r["experts"] for r in out[1]]
    assert "wrote 8 records" in runs[0].log and "wrote" not in runs[1].log
    assert "[0] add 37+8" not in runs[1].log


@pytest.mark.slow
def test_the_eval_harness_as_two_processes_gives_the_same_table(tmp_path):
    """Both modes with lazy experts (the default), 2 x 4 against 1 x 8."""
    args = ["-m", "fr_jax.eval", "--benchmarks=toy", "--modes=fusionroute,expert_only",
            "--limit=16", "--config.eval.batch_size=8", "--config.eval.progress=False",
            "--config.decode.lazy_experts=True"]
    home = tmp_path / "home"
    runs = {}
    for n in (1, 2):
        runs[n] = run_processes(n, args + [f"--workdir={tmp_path / str(n)}"],
                                tmp_path / f"log{n}", devices=8 // n, home=home, timeout=600)
    res = {n: json.load(open(tmp_path / str(n) / "results.json")) for n in (1, 2)}
    for k in ("accuracy", "shares", "average"):
        assert res[2][k] == res[1][k], k
    for mode in ("fusionroute", "expert_only"):  # one line per example: written once
        a, b = ([{k: v for k, v in json.loads(x).items() if k != "seconds"}
                 for x in open(tmp_path / str(n) / "generations" / "toy" / f"{mode}.jsonl")]
                for n in (1, 2))
        assert b == a and len(b) == 16
    assert "| toy world |" in runs[2][0].log and "| toy world |" not in runs[2][1].log
