"""Parent side, while and after the child runs: start it, supervise it, read what it left.

Also maps an exit status and the captured output to an :class:`Outcome` status."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time

from fr_jax.harness.sandbox.limits import (_CHILD_PATH, _KEEP_CHARS, _REASON_CHARS, _STATUS_NAME,
                                           Limits)
from fr_jax.harness.sandbox.runner_source import _RUNNER_SOURCE


def _read_setup_status(io_dir: str) -> tuple[dict | None, str]:
    """What the runner's setup phase reported: (achieved layers, "") or (None, why not)."""
    try:
        with open(os.path.join(io_dir, _STATUS_NAME), "rb") as handle:
            text = handle.read(_KEEP_CHARS).decode("utf-8", errors="replace")
    except OSError:
        text = ""
    if text.startswith("ok "):
        try:
            return json.loads(text[3:]), ""
        except ValueError:
            return None, "sandbox setup wrote an unreadable status"
    return None, text.strip() or "sandbox setup did not complete"


def _child_env(work_dir: str) -> dict[str, str]:
    return {"PATH": _CHILD_PATH, "HOME": work_dir, "TMPDIR": work_dir,
            "LANG": "C.UTF-8", "PYTHONHASHSEED": "0"}


def _wait_unreaped(pid: int, deadline: float) -> bool:
    """Poll until the child exits *without reaping it* (so its pgid stays reserved).

    Returns False if the deadline passed first.
    """
    delay = 0.001
    while True:
        info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        if info is not None and info.si_pid == pid:
            return True
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        time.sleep(min(delay, remaining))
        delay = min(delay * 2, 0.02)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


@dataclasses.dataclass
class _RawResult:
    returncode: int
    timed_out: bool
    cpu_seconds: float
    seconds: float


def _supervise(proc: subprocess.Popen, timeout_s: float, started: float) -> _RawResult:
    """Wait with a wall-clock limit; kill the process group; reap and collect CPU time."""
    exited = _wait_unreaped(proc.pid, started + timeout_s)
    seconds = time.monotonic() - started
    _kill_group(proc.pid)  # stray children die too; the zombie leader still holds the pgid
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)  # keep Popen's bookkeeping consistent
    return _RawResult(proc.returncode, not exited, usage.ru_utime + usage.ru_stime, seconds)


def _launch(work_dir: str, io_dir: str, limits: Limits) -> tuple[_RawResult, str, str]:
    """Start the child interpreter, supervise it, return raw result and output file paths.

    No ``preexec_fn``: everything between fork and exec (cwd, env, fds, new session) is done
    by ``_posixsubprocess`` in C; layer 3 is applied by the runner after exec."""
    out_path, err_path = os.path.join(io_dir, "stdout"), os.path.join(io_dir, "stderr")
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        started = time.monotonic()
        proc = subprocess.Popen(
            [sys.executable, "-I", "-S", "-B", "-c", _RUNNER_SOURCE, io_dir], cwd=work_dir,
            env=_child_env(work_dir), stdin=subprocess.DEVNULL, stdout=out, stderr=err,
            start_new_session=True, close_fds=True)
        try:
            raw = _supervise(proc, limits.timeout_s, started)
        except BaseException:
            _kill_group(proc.pid)
            proc.kill()
            proc.wait()
            raise
    return raw, out_path, err_path


def _read_head(path: str, cap: int) -> tuple[str, int]:
    """First ``_KEEP_CHARS`` bytes of a file (decoded) and the file size."""
    size = os.path.getsize(path)
    with open(path, "rb") as handle:
        data = handle.read(min(_KEEP_CHARS, cap))
    return data.decode("utf-8", errors="replace"), size


def _read_tail(path: str) -> tuple[str, int]:
    """Last ``_KEEP_CHARS`` bytes of a file (decoded): a traceback's end is what matters."""
    size = os.path.getsize(path)
    with open(path, "rb") as handle:
        handle.seek(max(0, size - _KEEP_CHARS))
        data = handle.read(_KEEP_CHARS)
    return data.decode("utf-8", errors="replace"), size


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:_REASON_CHARS] if lines else ""


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _looks_out_of_memory(stderr: str) -> bool:
    last = _last_line(stderr)
    return (last.startswith("MemoryError") or "Cannot allocate memory" in stderr
            or ("Fatal Python error" in stderr and "memory" in stderr.lower()))


def _classify(raw: _RawResult, limits: Limits, stderr: str, out_size: int,
              err_size: int) -> tuple[str, str]:
    """Map exit status and output to (status, reason)."""
    code = raw.returncode
    if raw.timed_out:
        return "timeout", f"killed after {limits.timeout_s} s wall-clock timeout"
    if code == 0:
        return "passed", ""
    cap = limits.max_output_bytes
    if (code == -signal.SIGXFSZ or out_size >= cap or err_size >= cap
            or "File too large" in stderr):
        return "output_limit", f"output or file size limit of {cap} bytes exceeded"
    if _looks_out_of_memory(stderr):
        return "memory", f"memory limit of {limits.memory_mb} MiB exceeded: {_last_line(stderr)}"[:_REASON_CHARS]
    cpu_limit = limits.cpu_seconds()
    if code == -signal.SIGXCPU or (code == -signal.SIGKILL and raw.cpu_seconds >= cpu_limit - 0.05):
        return "timeout", f"killed after exceeding the {cpu_limit} s CPU-time limit"
    if code < 0:
        return "killed", f"killed by {_signal_name(-code)}"
    return "failed", _last_line(stderr) or f"exit code {code}"


def _remove_tree(path: str) -> None:
    """Delete a directory even if the program removed permissions inside it."""

    def make_writable_and_retry(func, target, _exc_info):
        try:
            os.chmod(os.path.dirname(target), 0o700)
            if os.path.isdir(target) and not os.path.islink(target):
                os.chmod(target, 0o700)
            func(target)
        except OSError:
            pass

    shutil.rmtree(path, onerror=make_writable_and_retry)
    shutil.rmtree(path, ignore_errors=True)
