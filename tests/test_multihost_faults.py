"""A multi-process launch that cannot come together, done as a user would: `python -m
fr_jax.train` with the JAX_* variables of a launch whose other processes never start.
Each process says at once what it waits for, and after FR_JAX_INIT_TIMEOUT_S stops with
one line naming who is missing and the fix; a launch described without a coordinator is
refused instead of running as one process."""

import subprocess
import sys
import threading
import time

import pytest

from cli_env import REPO, one_device_env
from fr_jax.runtime import distributed
from fr_jax.runtime.errors import ConfigError
from launcher import free_port, process_env

TIMEOUT_S = 2  # FR_JAX_INIT_TIMEOUT_S of these launches


class Proc:
    """A `python -m fr_jax.train` subprocess whose stderr lines are kept with the second
    (since its start) at which each arrived."""

    def __init__(self, env, workdir):
        self.start = time.monotonic()
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "fr_jax.train", f"--config={REPO}/configs/tiny.py",
             f"--config.train.workdir={workdir}"], cwd=REPO, env=env,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.lines = []
        self.reader = threading.Thread(target=self._read)
        self.reader.start()

    def _read(self):
        for line in self.popen.stderr:
            self.lines.append((time.monotonic() - self.start, line.rstrip("\n")))

    def wait(self, timeout=120):
        try:
            self.popen.wait(timeout)
        finally:
            self.kill()
        return self.popen.returncode

    def kill(self):
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait()
        self.reader.join()

    def first_line_at(self) -> float:
        deadline = time.monotonic() + 120
        while not self.lines and self.popen.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert self.lines, "no line on stderr"
        return self.lines[0][0]


def launch_env(tmp_path, rank, n, port):
    return process_env(tmp_path / "home", rank, n, 1, port,
                       {"FR_JAX_INIT_TIMEOUT_S": str(TIMEOUT_S)})


def assert_waits_then_fails(proc, waiting, error):
    """stderr: the waiting line first, then after the timeout one error line and nothing
    else (no traceback, no logs of JAX's teardown); exit status 1."""
    assert proc.wait() == 1, proc.lines
    text = "\n".join(line for _, line in proc.lines)
    assert "Traceback" not in text, text
    (t_wait, first), (t_error, last) = proc.lines[0], proc.lines[-1]
    assert len(proc.lines) == 2, text
    assert all(w in first for w in waiting), first
    assert last.startswith("error: ") and all(e in last for e in error), last
    assert t_error - t_wait >= TIMEOUT_S - 0.5, proc.lines  # said before waiting, not after


@pytest.mark.slow
def test_a_process_whose_peer_never_starts_says_what_it_waits_for_and_who_is_missing(
        tmp_path):
    # Each process of a 2-process launch alone, on a port of its own (both at once).
    ports = [free_port(), free_port()]
    procs = [Proc(launch_env(tmp_path, rank, 2, ports[rank]), tmp_path / f"work{rank}")
             for rank in (0, 1)]
    fix = "each with its own JAX_PROCESS_ID in 0..1"
    addr = [f"127.0.0.1:{p}" for p in ports]
    assert_waits_then_fails(
        procs[0], ["process 0 of 2", addr[0], f"up to {TIMEOUT_S} s", "process 1 to connect"],
        ["process 1 never connected", addr[0], f"JAX_COORDINATOR_ADDRESS={addr[0]}",
         "JAX_NUM_PROCESSES=2", fix])
    assert_waits_then_fails(
        procs[1], ["process 1 of 2", addr[1], f"up to {TIMEOUT_S} s"],
        [f"the coordinator at {addr[1]} (process 0) did not answer within {TIMEOUT_S} s",
         fix])
    assert not any((tmp_path / f"work{rank}").exists() for rank in (0, 1))


@pytest.mark.slow
def test_a_process_that_reaches_the_coordinator_names_the_process_still_missing(tmp_path):
    # 3 processes, process 2 never started: process 1, once the coordinator (process 0)
    # is up, says that it is process 2 that is missing.
    port = free_port()
    coordinator = Proc(process_env(tmp_path / "home", 0, 3, 1, port,
                                   {"FR_JAX_INIT_TIMEOUT_S": "120"}), tmp_path / "work0")
    try:
        coordinator.first_line_at()
        peer = Proc(launch_env(tmp_path, 1, 3, port), tmp_path / "work1")
        assert_waits_then_fails(
            peer, ["process 1 of 3", f"127.0.0.1:{port}"],
            [f"the coordinator at 127.0.0.1:{port} answers, but process 2 never connected",
             "JAX_PROCESS_ID in 0..2"])
        assert coordinator.popen.poll() is None  # still waiting for the others
    finally:
        coordinator.kill()


def test_a_launch_without_a_coordinator_is_refused_instead_of_running_alone(tmp_path):
    env = one_device_env(tmp_path / "home")
    env.pop("JAX_COORDINATOR_ADDRESS", None)
    env.update(JAX_PLATFORMS="cpu", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID="1")
    run = subprocess.run([sys.executable, "-m", "fr_jax.train", f"--config={REPO}/configs/tiny.py",
                          f"--config.train.workdir={tmp_path / 'work'}"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 1 and run.stderr.count("\n") == 1, run.stderr
    assert run.stderr.startswith("error: JAX_NUM_PROCESSES=2 and JAX_PROCESS_ID=1 without "
                                 "JAX_COORDINATOR_ADDRESS: this process would run alone")
    assert not (tmp_path / "work").exists()


@pytest.mark.parametrize("env, refused", [
    ({"JAX_NUM_PROCESSES": "4"}, "JAX_NUM_PROCESSES=4 without JAX_COORDINATOR_ADDRESS"),
    ({"JAX_PROCESS_ID": "2"}, "JAX_PROCESS_ID=2 without JAX_COORDINATOR_ADDRESS"),
    ({"JAX_NUM_PROCESSES": "1", "JAX_PROCESS_ID": "0"}, None),  # one process, said so
    ({"JAX_NUM_PROCESSES": "1"}, None),
    ({"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1", "JAX_NUM_PROCESSES": "0",
      "JAX_PROCESS_ID": "0"}, "JAX_NUM_PROCESSES=0"),
    ({"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1", "JAX_NUM_PROCESSES": "2",
      "JAX_PROCESS_ID": "0", "FR_JAX_INIT_TIMEOUT_S": "0"}, "FR_JAX_INIT_TIMEOUT_S=0"),
])
def test_the_launch_variables_are_checked_before_anything_waits(monkeypatch, env, refused):
    for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID",
              "TPU_WORKER_HOSTNAMES", "FR_JAX_INIT_TIMEOUT_S"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    if refused is None:
        assert distributed.initialize() is False
    else:
        with pytest.raises(ConfigError, match=refused):
            distributed.initialize()


def test_the_missing_processes_are_named_as_exactly_as_is_known():
    launch = distributed._Launch("10.0.0.1:1234", 8, 0, 300)
    assert "process 0 of 8: coordinator at 10.0.0.1:1234, waiting up to 300 s " \
           "(FR_JAX_INIT_TIMEOUT_S) for processes 1 to 7 to connect" == launch.waiting()
    assert launch.missing().startswith(
        "process 0 of 8: processes 1 to 7 (all or some of them: JAX does not say which) "
        "never connected to the coordinator at 10.0.0.1:1234 within 300 s")
    assert "\n" not in launch.missing()
    alone = distributed._Launch("10.0.0.1:1234", 1, 0, 300)  # a coordinator of its own
    assert "for no other process to connect" in alone.waiting()
    assert "its own coordinator at 10.0.0.1:1234 did not let it join" in alone.missing()
