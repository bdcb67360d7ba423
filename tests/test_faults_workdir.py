"""A training run's workdir as a careless user meets it (issue 31): a second command on a
busy workdir, Ctrl-C in the middle of a stage, a workdir that cannot be written, a workdir
that is one of the run's inputs. The real command line, real processes and files."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from cli_env import REPO, one_device_env
from fr_jax.runtime.bundle import bundled_world

TINY = os.path.join(REPO, "configs", "tiny.py")


def _args(workdir, sft_file, steps=4, experts=None):
    world = bundled_world()
    return ["--config=" + TINY, f"--config.router.path={world['router_base']}",
            f"--config.experts.paths={tuple(experts or world['experts'])!r}",
            f"--config.data.sft_path={sft_file}", f"--config.train.workdir={workdir}",
            "--config.train.stages=('sft',)", f"--config.train.sft.steps={steps}",
            "--config.train.ckpt_every=2", "--config.train.log_every=1",
            "--config.train.eval_every=0", "--config.train.sample_every=0",
            "--config.train.sft.expert_signals=online"]


def _train(argv):
    from fr_jax.train import main
    return main(argv)


def _popen_as_from_a_terminal(args, **kw):
    """Popen with SIGINT at its default in the child, as a command started from a terminal
    has it, however this suite was started: a background job of a non-interactive shell
    runs with SIGINT ignored, and an ignored signal is inherited across exec (Python then
    installs no KeyboardInterrupt), where a handled one is reset to the default."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return subprocess.Popen(args, **kw)
    finally:
        signal.signal(signal.SIGINT, previous)


def _steps(workdir):
    folder = os.path.join(workdir, "sft", "checkpoints")
    return sorted(int(d) for d in os.listdir(folder) if d.isdigit()) if os.path.isdir(
        folder) else []


@pytest.mark.slow
def test_a_busy_workdir_is_refused_and_ctrl_c_says_where_the_run_goes_on(tmp_path, sft_file,
                                                                          capsys):
    run = tmp_path / "run"
    first = _popen_as_from_a_terminal(
        [sys.executable, "-m", "fr_jax.train", *_args(run, sft_file, steps=100000)],
        cwd=REPO, env=one_device_env(tmp_path / "home"), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while len(_steps(run)) < 2 and first.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert first.poll() is None and len(_steps(run)) >= 2, first.communicate()[1][-3000:]

        record = (run / "sft" / "run.json").read_text()
        with pytest.raises(SystemExit) as e:  # the same command again, while the first runs
            _train(_args(run, sft_file, steps=100000))
        line = str(e.value)
        assert line.startswith(f"error: {run} is in use by another training run (process "
                               f"{first.pid} on "), line
        assert line.endswith("wait for it to end, stop it, or give this run another "
                             "--config.train.workdir") and "\n" not in line
        assert (run / "sft" / "run.json").read_text() == record

        first.send_signal(signal.SIGINT)  # Ctrl-C
        _, err = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    last = err.strip().splitlines()[-1]
    saved = _steps(run)[-1]
    assert last.startswith("interrupted: stage sft at step ") and last.endswith(
        f" of 100000; the same command resumes sft from step {saved}"), last
    stopped = int(last.split(" at step ")[1].split()[0])
    assert saved <= stopped <= saved + 2  # checkpoints every 2 steps: at most two are redone


def test_a_workdir_that_is_an_input_checkpoint_is_refused_before_writing(tmp_path, sft_file):
    world = bundled_world()
    expert = tmp_path / "math"
    shutil.copytree(world["experts"][0], expert)
    before = sorted(os.listdir(expert))
    for workdir in (expert, expert / "runs"):
        with pytest.raises(SystemExit) as e:
            _train(_args(workdir, sft_file, experts=[str(expert), *world["experts"][1:]]))
        assert str(e.value) == (
            f"error: --config.train.workdir={workdir} is (or lies inside) the input "
            f"checkpoint folder {expert}: the run would write its stages and checkpoints "
            "into it; choose a workdir of its own")
    assert sorted(os.listdir(expert)) == before


@pytest.mark.parametrize("where", ["under_a_file", "proc"])
def test_a_workdir_that_cannot_be_written_fails_before_any_work(where, tmp_path, sft_file):
    if where == "under_a_file":
        (tmp_path / "file").write_text("x")
        workdir = tmp_path / "file" / "run"
    else:  # a mount no one can create folders on, root included
        workdir = "/proc/fr_jax_run"
    with pytest.raises(SystemExit) as e:
        _train(_args(workdir, sft_file))
    line = str(e.value)
    assert line.startswith(f"error: cannot write the training workdir {workdir} (") and \
        line.endswith("give --config.train.workdir a folder you can write to"), line
    assert "\n" not in line


def test_the_workdir_lock_names_its_holder_from_what_it_wrote(tmp_path):
    from fr_jax.loop.workdir import _holder

    assert _holder(json.dumps({"pid": 7, "host": "h", "since": "2026-12-05 12:00:00"})) == \
        "process 7 on h, since 2026-12-05 12:00:00"
    assert _holder("") == "a process that holds its lock"
