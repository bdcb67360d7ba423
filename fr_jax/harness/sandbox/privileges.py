"""Parent side, before the child starts: who it runs as and what it is handed.

Decides the uid/gid drop (and whether the target user can still reach the interpreter),
plans the rlimits, and writes the runner's config and the program into their directories."""

from __future__ import annotations

import dataclasses
import json
import os
import pwd
import resource
import sys
import sysconfig

from fr_jax.harness.sandbox.limits import _CONFIG_NAME, _NOBODY_ID, _PROGRAM_NAME, Limits


@dataclasses.dataclass(frozen=True)
class _Privileges:
    """Which uid/gid the child switches to, computed fresh per call (no global state)."""

    uid: int | None  # None: keep the current uid
    gid: int | None
    keep_read_cap: bool  # retain CAP_DAC_READ_SEARCH so the interpreter stays reachable


def _target_ids(user: str) -> tuple[int, int] | None:
    """uid/gid to drop to, or None when no drop is requested or possible (not root)."""
    if user == "none" or os.geteuid() != 0:
        return None
    if user == "auto":
        return _NOBODY_ID, _NOBODY_ID
    entry = pwd.getpwnam(user)  # a misconfigured user name is a harness bug: let it raise
    return entry.pw_uid, entry.pw_gid


def _permits(st: os.stat_result, uid: int, gid: int, bits: int) -> bool:
    """Whether mode bits (4=r, 2=w, 1=x) are granted to uid/gid by a stat result."""
    if st.st_uid == uid:
        shift = 6
    elif st.st_gid == gid:
        shift = 3
    else:
        shift = 0
    return (st.st_mode >> shift) & bits == bits


def _reachable(path: str, uid: int, gid: int, bits: int) -> bool:
    """Whether uid/gid can traverse to ``path`` and has ``bits`` on it (plain DAC, no ACLs)."""
    real = os.path.realpath(path)
    parts = [p for p in real.split("/") if p]
    current = "/"
    try:
        for name in parts:
            if not _permits(os.stat(current), uid, gid, 1):
                return False
            current = os.path.join(current, name)
        return _permits(os.stat(current), uid, gid, bits)
    except OSError:
        return False


def _interpreter_reachable(uid: int, gid: int) -> bool:
    """Whether the target user can exec the interpreter and read its stdlib."""
    checks = [(sys.executable, 1)]
    for key in ("stdlib", "platstdlib"):
        checks.append((sysconfig.get_path(key), 5))
    libdir, library = sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("LDLIBRARY")
    if sysconfig.get_config_var("Py_ENABLE_SHARED") and libdir and library:
        checks.append((os.path.join(libdir, library), 4))
    return all(_reachable(path, uid, gid, bits) for path, bits in checks)


def _privileges(limits: Limits) -> _Privileges:
    ids = _target_ids(limits.user)
    if ids is None:
        return _Privileges(None, None, False)
    uid, gid = ids
    return _Privileges(uid, gid, not _interpreter_reachable(uid, gid))


def _rlimit_plan(limits: Limits) -> list[tuple[int, int, int]]:
    """(kind, soft, hard) for every rlimit the runner lowers; CPU gets soft SIGXCPU, hard SIGKILL."""
    memory = limits.memory_mb * 1024 * 1024
    cpu = limits.cpu_seconds()
    return [
        (resource.RLIMIT_CPU, cpu, cpu + 1),
        (resource.RLIMIT_AS, memory, memory),
        (resource.RLIMIT_FSIZE, limits.max_output_bytes, limits.max_output_bytes),
        (resource.RLIMIT_NOFILE, limits.max_open_files, limits.max_open_files),
        (resource.RLIMIT_NPROC, limits.max_processes, limits.max_processes),
        (resource.RLIMIT_CORE, 0, 0),
    ]


def _write_config(io_dir: str, limits: Limits, privileges: _Privileges, audit_hook: bool) -> None:
    """The runner's layer-3 plan, in the parent-owned io dir (readable by the child before its drop).

    Passing it as data rather than doing the work in a ``preexec_fn`` means no Python code runs
    between fork and exec, which is what makes starting children from a multithreaded parent
    (JAX, a thread pool) safe: CPython's ``_posixsubprocess`` does the rest in C."""
    config = {"program": _PROGRAM_NAME, "audit_hook": audit_hook, "rlimits": _rlimit_plan(limits),
              "uid": privileges.uid, "gid": privileges.gid, "keep_read_cap": privileges.keep_read_cap}
    with open(os.path.join(io_dir, _CONFIG_NAME), "w", encoding="utf-8") as handle:
        json.dump(config, handle)


def _prepare_work_dir(work_dir: str, source: str, privileges: _Privileges) -> None:
    """Write the program and hand the directory to the sandbox user."""
    path = os.path.join(work_dir, _PROGRAM_NAME)
    with open(path, "w", encoding="utf-8", errors="surrogatepass") as handle:
        handle.write(source)
    if privileges.uid is not None:
        os.chown(work_dir, privileges.uid, privileges.gid)
        os.chown(path, privileges.uid, privileges.gid)
