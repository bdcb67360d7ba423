"""Run one untrusted, LLM-generated Python program in a contained child process.

The evaluation harness feeds HumanEval / MBPP solutions (followed by their
asserts) to :func:`run_python`.  Every sample gets its own process, its own
temporary directory and its own limits; whatever the program does is reported
as an :class:`Outcome` and never raised into the harness.

Protection layers (each degrades gracefully when the kernel refuses it; see
:func:`protections` for what is active on the current machine):

1. Fresh working directory per sample (``tempfile.mkdtemp``), removed after the
   run, also on timeout.  stdout/stderr go to files in a *second*, parent-owned
   directory the child cannot reach by path; only a bounded head/tail is read.
2. A separate interpreter: ``python -I -S -B`` (isolated mode, no ``site``, so
   neither site-packages nor this project are importable; no .pyc writes),
   a minimal environment, stdin from /dev/null, a new session/process group,
   no inherited file descriptors.
3. At the very start of the runner, in the new interpreter *after* ``exec`` and
   before the audit hook is installed or any untrusted code runs (the parent
   passes the plan as ``config.json`` in its private io directory).  It is not
   done in a ``preexec_fn``: that would make CPython fork and run Python code
   between fork and exec, which can deadlock in a multithreaded parent (JAX,
   the harness's thread pool).  Now nothing but ``_posixsubprocess``'s C code
   runs in the forked child.  The runner applies:
   a. a new, empty network namespace (``unshare(CLONE_NEWNET)``; falls back to
      ``CLONE_NEWUSER|CLONE_NEWNET`` when not root): even a socket that slips
      past layer 4 finds no interface ("Network is unreachable");
   b. rlimits: address space, CPU seconds, file size (= output cap, so a
      runaway writer gets EFBIG/SIGXFSZ), open files, processes, no core dumps;
   c. when running as root with ``user="auto"`` (or a named user): drop real,
      effective and saved uid/gid to ``nobody`` (65534) with no supplementary
      groups, so the kernel denies writes to root-owned files, kill() of other
      users' processes and enforces RLIMIT_NPROC (root ignores it).  If
      ``nobody`` cannot reach the interpreter's files (e.g. under a 0700
      ``/root``), the runner keeps only CAP_DAC_READ_SEARCH (``PR_SET_KEEPCAPS``
      across ``setuid``, then ``capset`` to effective+permitted; no ambient
      capability, as no exec follows) so that the stdlib stays importable; it
      then can *read* any file at kernel level (reads are still filtered by
      layer 4) but still cannot write root-owned files.
   ctypes (for unshare/prctl/capset) is used only in this phase and removed
   from ``sys.modules`` before the program runs.  The runner reports to the
   parent through a status file in the io directory, closed before the program
   starts; an outcome is trusted only when it says ``ok``.  A network namespace
   or rlimit that the kernel refuses is simply absent (as :func:`protections`
   reports), but a failed uid drop ends the child before the program runs and
   is reported as ``sandbox_error``.
4. A runner installed before the program runs adds a ``sys.addaudithook``
   hook that raises PermissionError for: sockets, process creation (fork,
   exec, spawn, system, subprocess, kill), ctypes, loading native extension
   modules from outside the stdlib, sub-interpreters, gc object walking,
   resource.setrlimit, writes / destructive file operations outside the
   temp dir, and reads outside the temp dir and the stdlib directories.  The
   hook resolves symlinks itself with captured C functions, so monkeypatching
   ``os``/``posixpath`` does not fool it, and it is unreachable from Python
   (never stored in a namespace; ``gc.get_objects`` & co. are denied).
5. The parent waits with a wall-clock timeout, kills the whole process group
   with SIGKILL on timeout and *always* again after the child exits (while the
   child is still an unreaped zombie, so the group id cannot have been reused).

What this does NOT protect against:

* Kernel exploits: there is no seccomp filter, no mount/PID namespace, no
  chroot.  The child sees the real filesystem, the process list and /proc.
* The audit hook is a Python-level guard.  Code that reaches native execution
  bypasses it: e.g. crafted bytecode via ``marshal.loads`` (allowed because
  the import system needs it) that corrupts the interpreter, or a C extension
  in the stdlib that opens files in C (e.g. some dbm backends).  Only the
  kernel layers (3) remain after such a bypass.
* Reading world-readable files (and, with the CAP_DAC_READ_SEARCH fallback,
  any file) is blocked only by the audit hook.  ``os.stat``/``os.readlink``
  metadata is not blocked at all.
* A process that escapes its process group via ``setsid`` survives the final
  ``killpg``; only the audit hook (which blocks creating processes at all)
  prevents that.  RLIMIT_NPROC counts *all* processes of uid ``nobody``,
  including concurrent samples, so ``max_processes`` must exceed the
  harness's parallelism.
* Without the uid drop (``user="none"`` or not root) /tmp and every file the
  harness user can write are writable at kernel level; only the hook guards
  them.
* No CPU-time fairness between concurrent samples, no disk quota beyond the
  per-file size limit (many files of ``max_output_bytes`` each are possible),
  no limit on wall-clock sleeping other than the timeout.
* Path checks and the actual open are not atomic: a program that races its
  own threads with symlink swaps inside its temp dir can win (TOCTOU).
* ``os._exit(0)`` before the asserts run is reported as "passed"
  (``SystemExit``, in contrast, is reported as a failure).

Layout: ``limits`` (Limits, Outcome, shared constants), ``runner_source`` (the
text the child executes: runner and probe), ``privileges`` (uid drop, rlimit
plan, what the child is handed), ``process`` (start, supervise, kill, read,
classify); this module ties them together and holds the public API.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

from fr_jax.harness.sandbox.limits import _CAP_DAC_READ_SEARCH, _REASON_CHARS, Limits, Outcome
# _write_config is looked up here at call time, so a test can monkeypatch it on this package.
from fr_jax.harness.sandbox.privileges import _prepare_work_dir, _privileges, _Privileges, _write_config
from fr_jax.harness.sandbox.process import (_classify, _launch, _read_head, _read_setup_status, _read_tail,
                                            _remove_tree)
from fr_jax.harness.sandbox.runner_source import _PROBE_SOURCE

__all__ = ["Limits", "Outcome", "run_python", "protections"]


def _error_outcome(reason: str, seconds: float = 0.0) -> Outcome:
    return Outcome("sandbox_error", None, "", "", seconds, reason[:_REASON_CHARS])


def _run_in_dirs(source: str, limits: Limits, privileges: _Privileges, audit_hook: bool,
                 work_dir: str, io_dir: str) -> tuple[Outcome, dict | None]:
    """Prepare, launch and classify one run; also return what the runner's setup achieved."""
    _prepare_work_dir(work_dir, source, privileges)
    _write_config(io_dir, limits, privileges, audit_hook)
    try:
        raw, out_path, err_path = _launch(work_dir, io_dir, limits)
    except (OSError, subprocess.SubprocessError) as exc:
        return _error_outcome(f"could not start the sandboxed interpreter: {exc}"), None
    stdout, out_size = _read_head(out_path, limits.max_output_bytes)
    stderr, err_size = _read_tail(err_path)
    achieved, problem = _read_setup_status(io_dir)
    if achieved is None:  # never judge a program that may have run without its protections
        return Outcome("sandbox_error", raw.returncode, stdout, stderr, raw.seconds,
                       problem[:_REASON_CHARS]), None
    status, reason = _classify(raw, limits, stderr, out_size, err_size)
    return Outcome(status, raw.returncode, stdout, stderr, raw.seconds, reason), achieved


def _run_sandboxed(source: str, limits: Limits, audit_hook: bool = True) -> tuple[Outcome, dict | None]:
    """One run in fresh directories that are always removed afterwards."""
    privileges = _privileges(limits)
    work_dir = tempfile.mkdtemp(prefix="sbx_work_")
    io_dir = tempfile.mkdtemp(prefix="sbx_io_")
    try:
        return _run_in_dirs(source, limits, privileges, audit_hook, work_dir, io_dir)
    finally:
        _remove_tree(work_dir)
        _remove_tree(io_dir)


def run_python(source: str, limits: Limits = Limits()) -> Outcome:
    """Run ``source`` as ``__main__`` in a fresh sandboxed interpreter and report what happened.

    Never raises because of anything the program does; safe to call from many threads.
    """
    return _run_sandboxed(source, limits)[0]


def _parse_probe(text: str) -> dict:
    """Fields printed by ``_PROBE_SOURCE``; raises ValueError when malformed."""
    fields = text.split()
    if len(fields) != 6:
        raise ValueError(f"unexpected probe output: {text[:200]!r}")
    return {"uid": int(fields[0]), "net": fields[1], "memory": int(fields[2]), "nproc": int(fields[3]),
            "cap_effective": int(fields[4], 16), "cap_permitted": int(fields[5], 16)}


def _probe_kernel_layers(limits: Limits) -> dict:
    """Run the probe with the runner's layer-3 setup but no audit hook; combine what the setup
    reported with what the probe observed from inside."""
    privileges = _privileges(limits)
    try:
        outcome, achieved = _run_sandboxed(_PROBE_SOURCE, limits, audit_hook=False)
        if not outcome.passed or achieved is None:
            return {"probe_ok": False}
        seen = _parse_probe(outcome.stdout)
    except (OSError, subprocess.SubprocessError, ValueError):
        return {"probe_ok": False}
    read_cap = 1 << _CAP_DAC_READ_SEARCH
    return {
        "probe_ok": True,
        "uid": seen["uid"],
        "only_read_cap": ((seen["cap_effective"] | seen["cap_permitted"]) & ~read_cap) == 0,
        "network_namespace": bool(achieved.get("network_namespace")) and seen["net"] in ("unreachable", "nosocket"),
        "rlimits": bool(achieved.get("rlimits")) and seen["memory"] == limits.memory_mb * 1024 * 1024,
        "nproc_limit": seen["nproc"] == limits.max_processes,
        "keep_read_cap": bool(seen["cap_effective"] & read_cap),
        "wanted_uid": privileges.uid,
    }


def _audit_hook_works(limits: Limits) -> bool:
    """Whether the runner's hook really blocks a socket and a write outside the sandbox."""
    program = (
        "import socket\n"
        "try:\n    socket.socket()\nexcept PermissionError:\n    pass\nelse:\n    raise SystemExit(3)\n"
        "try:\n    open('/sbx-audit-probe', 'w')\nexcept PermissionError:\n    pass\nelse:\n    raise SystemExit(3)\n"
    )
    return run_python(program, limits).passed


def protections(limits: Limits = Limits(timeout_s=10.0, memory_mb=256)) -> dict:
    """Which protection layers are active on this machine (for logs and docs/evaluation.md).

    Starts two short probe children, so it takes a fraction of a second.
    """
    kernel = _probe_kernel_layers(limits)
    uid_drop = bool(kernel.get("probe_ok")) and kernel.get("wanted_uid") is not None \
        and kernel.get("uid") == kernel.get("wanted_uid") and bool(kernel.get("only_read_cap"))
    running_as_root = os.geteuid() == 0
    return {
        "separate_process": True,
        "temp_dir": True,
        "isolated_interpreter": True,
        "new_session": True,
        "network_namespace": bool(kernel.get("network_namespace", False)),
        "uid_drop": uid_drop,
        "uid_drop_keeps_read_capability": bool(uid_drop and kernel.get("keep_read_cap")),
        "rlimits": bool(kernel.get("rlimits", False)),
        "rlimit_nproc_enforced": bool(kernel.get("nproc_limit")) and (uid_drop or not running_as_root),
        "audit_hook": hasattr(sys, "addaudithook") and _audit_hook_works(limits),
        "seccomp": False,
    }
