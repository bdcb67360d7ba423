"""Several JAX processes on this machine, each running one of fr_jax's command lines: the
multi-host paths of a TPU pod, exercised on a CPU.

`run_processes(n, args, ...)` starts `python -m fr_jax.<command> args` n times, as the
processes 0..n-1 of one JAX program (a free localhost port for the coordinator,
`--xla_force_host_platform_device_count` devices each, gloo collectives), each with its own
log file; it waits for all of them under one hard timeout and kills every process of the
launch as soon as one fails, so a peer never waits forever on a dead one. n = 1 runs one
plain process (no coordinator), the reference the multi-process runs are compared with.
"""

from __future__ import annotations

import dataclasses
import fcntl
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Callable, List, Optional, Sequence

from cli_env import REPO, one_device_env


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclasses.dataclass
class Run:
    """One process of a launch: its return code (None: killed by the harness) and log."""

    rank: int
    returncode: Optional[int]
    log_path: str

    @property
    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()


class LaunchError(AssertionError):
    pass


def process_env(home, rank: int, n: int, devices: int, port: int, extra=None) -> dict:
    env = one_device_env(home)
    env["XLA_FLAGS"] = f"{env['XLA_FLAGS']} --xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        env.pop(k, None)
    if n > 1:
        env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(n),
                   JAX_PROCESS_ID=str(rank))
    env.update(extra or {})
    return env


def run_processes(n: int, args: Sequence[str], logdir, *, devices: int = 8, home=None,
                  timeout: float = 600, env: Optional[dict] = None,
                  on_start: Optional[Callable[[List[subprocess.Popen]], None]] = None,
                  check: bool = True, stop_on_failure: bool = True) -> List[Run]:
    """Runs `python <args>` as processes 0..n-1 of one JAX program (`devices` CPU devices
    each; n = 1: one plain process). Every process's output goes to <logdir>/proc<i>.log.
    The first failure (or the timeout) kills every process of the launch. With `check`,
    raises LaunchError quoting the failing processes' log tails; else returns the runs
    (`on_start(procs)` may act on the live processes, e.g. kill one mid-run;
    `stop_on_failure=False` lets the others run on after a failure, until the timeout, to
    see how they end)."""
    os.makedirs(logdir, exist_ok=True)
    # One launch at a time on this machine (the suite's workers share it): gloo's waiting
    # processes poll and starve a neighbouring launch. (An 8-device process aborting at
    # XLA's 40 s in-process rendezvous, first blamed on two launches at once, was later
    # reproduced beside mere busy loops: an XLA CPU collectives hang, see test_multihost.)
    with open(os.path.join(tempfile.gettempdir(), "fr_jax_launch.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _launch(n, args, logdir, devices, home, timeout, env, on_start, check,
                       stop_on_failure)


def _launch(n, args, logdir, devices, home, timeout, env, on_start, check, stop_on_failure):
    home = home or os.path.join(logdir, "home")
    port = free_port()
    procs, runs = [], []
    for rank in range(n):
        path = os.path.join(logdir, f"proc{rank}.log")
        with open(path, "w") as log:
            procs.append(subprocess.Popen(
                [sys.executable, *args], cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                env=process_env(home, rank, n, devices, port, env), start_new_session=True))
        runs.append(Run(rank, None, path))
    if on_start is not None:
        on_start(procs)
    deadline = time.monotonic() + timeout
    failed = timed_out = False
    try:
        while any(p.poll() is None for p in procs):
            if stop_on_failure and any(p.poll() not in (None, 0) for p in procs):
                failed = True
                break
            if time.monotonic() > deadline:
                timed_out = True
                break
            time.sleep(0.2)
    finally:
        for p in procs:  # every process group of the launch: nothing outlives the test
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    for run, p in zip(runs, procs):
        run.returncode = p.returncode
    if check and (failed or timed_out or any(r.returncode != 0 for r in runs)):
        what = f"timed out after {timeout:.0f} s" if timed_out else "failed"
        tails = "\n".join(f"--- process {r.rank} (rc {r.returncode}):\n{r.log[-2500:]}"
                          for r in runs if r.returncode != 0)
        raise LaunchError(f"{n}-process launch {what}: {' '.join(args)}\n{tails}")
    return runs
