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
3. In the child before ``exec`` (``preexec_fn``):
   a. a new, empty network namespace (``unshare(CLONE_NEWNET)``; falls back to
      ``CLONE_NEWUSER|CLONE_NEWNET`` when not root): even a socket that slips
      past layer 4 finds no interface ("Network is unreachable");
   b. rlimits: address space, CPU seconds, file size (= output cap, so a
      runaway writer gets EFBIG/SIGXFSZ), open files, processes, no core dumps;
   c. when running as root with ``user="auto"`` (or a named user): drop to
      uid/gid ``nobody`` (65534) with no supplementary groups, so the kernel
      denies writes to root-owned files, kill() of other users' processes and
      enforces RLIMIT_NPROC (root ignores it).  If ``nobody`` cannot reach the
      interpreter (e.g. it lives under a 0700 ``/root``), the child keeps only
      the CAP_DAC_READ_SEARCH capability (as an ambient capability) so that it
      can still read the interpreter and the stdlib; it then can *read* any
      file at kernel level (reads are still filtered by layer 4) but still
      cannot write root-owned files.
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
"""

from __future__ import annotations

import ctypes
import dataclasses
import math
import os
import pwd
import resource
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time

__all__ = ["Limits", "Outcome", "run_python", "protections"]

_CLONE_NEWNET = 0x40000000
_CLONE_NEWUSER = 0x10000000
_NOBODY_ID = 65534
_CAP_DAC_READ_SEARCH = 2
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
_PR_SET_KEEPCAPS = 8
_PR_CAP_AMBIENT = 47
_PR_CAP_AMBIENT_RAISE = 2
_KEEP_CHARS = 4096
_REASON_CHARS = 300
_PROGRAM_NAME = "program.py"
_CHILD_PATH = "/usr/bin:/bin"


@dataclasses.dataclass(frozen=True)
class Limits:
    """Per-sample resource limits; the defaults suit HumanEval/MBPP programs."""

    timeout_s: float = 10.0  # wall clock
    memory_mb: int = 1024  # RLIMIT_AS
    cpu_s: int = 0  # RLIMIT_CPU; 0 = ceil(timeout_s) + 1
    max_output_bytes: int = 1 << 20  # cap on stdout+stderr each, and on any file written (RLIMIT_FSIZE)
    max_processes: int = 16  # RLIMIT_NPROC where it is enforced
    max_open_files: int = 64
    user: str = "auto"  # "auto": as root drop to nobody (65534); "none": keep the uid; or a user name

    def cpu_seconds(self) -> int:
        """RLIMIT_CPU soft limit: explicit, or a bit above the wall clock so the wall clock fires first."""
        return self.cpu_s if self.cpu_s > 0 else int(math.ceil(self.timeout_s)) + 1


@dataclasses.dataclass
class Outcome:
    """What happened to one sample.  ``status`` is one of:
    passed | failed | timeout | memory | output_limit | killed | sandbox_error."""

    status: str
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float
    reason: str

    @property
    def passed(self) -> bool:
        return self.status == "passed"


# --------------------------------------------------------------------------- #
# The runner: executed by the child interpreter with ``-c`` before the program.
# Everything it needs is captured in closures before the untrusted code runs.
# --------------------------------------------------------------------------- #

_RUNNER_SOURCE = r'''
import os, sys, sysconfig, traceback, types

def _install_guard(work_dir, read_roots):
    """Install the audit hook; nothing outside this frame keeps a reference to it."""
    lstat, readlink, getcwd = os.lstat, os.readlink, os.getcwd
    str_copy, bytes_decode = str.__str__, bytes.decode
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    link_bits, type_bits = 0o120000, 0o170000
    work_prefix = work_dir + "/"
    read_prefixes = tuple(r.rstrip("/") + "/" for r in read_roots)
    read_exact = frozenset(read_roots) | {"/dev/null", "/dev/urandom", "/dev/random", "/dev/zero"}
    write_exact = frozenset({"/dev/null"})
    always_denied = frozenset({
        "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty",
        "os.kill", "os.killpg", "subprocess.Popen", "pty.spawn", "signal.pthread_kill",
        "gc.get_objects", "gc.get_referrers", "gc.get_referents", "setopencodehook",
        "cpython.PyInterpreterState_New", "cpython._PySys_ClearAuditHooks",
        "resource.setrlimit", "resource.prlimit", "code.__new__",
        "sqlite3.enable_load_extension", "sqlite3.load_extension", "webbrowser.open",
    })
    denied_prefixes = ("socket.", "ctypes.")
    denied_modules = frozenset({
        "_posixsubprocess", "_xxsubinterpreters", "_testcapi", "_testinternalcapi",
        "_testmultiphase", "_testbuffer", "_testimportmultiple", "_ctypes_test", "_xxtestfuzz",
    })
    write_ops = {  # event -> indices of path arguments that must stay inside the temp dir
        "os.remove": (0,), "os.rmdir": (0,), "os.mkdir": (0,), "os.chmod": (0,),
        "os.chown": (0,), "os.utime": (0,), "os.truncate": (0,), "os.setxattr": (0,),
        "os.removexattr": (0,), "os.chflags": (0,), "os.lchflags": (0,),
        "os.rename": (0, 1), "os.link": (0, 1), "os.symlink": (1,), "os.chdir": (0,),
        "shutil.rmtree": (0,), "shutil.chown": (0,), "shutil.copymode": (1,),
        "shutil.copystat": (1,), "shutil.copyfile": (1,), "shutil.copytree": (1,),
        "shutil.move": (0, 1), "shutil.make_archive": (0,), "shutil.unpack_archive": (1,),
        "tempfile.mkstemp": (0,), "tempfile.mkdtemp": (0,),
    }
    read_ops = {
        "os.listdir": (0,), "os.scandir": (0,), "os.walk": (0,), "os.fwalk": (0,),
        "glob.glob": (0,), "glob.glob/2": (0,), "os.getxattr": (0,), "os.listxattr": (0,),
        "shutil.copyfile": (0,), "shutil.copytree": (0,), "shutil.make_archive": (2,),
        "shutil.unpack_archive": (0,),
    }
    dir_fd_index = {"os.remove": 1, "os.rmdir": 1, "os.mkdir": 2, "os.chmod": 2,
                    "os.chown": 3, "os.utime": 3, "os.symlink": 2, "os.rename": 2, "os.link": 2}

    def as_text(path):
        """Exact str of a path argument (str subclasses cannot lie about their value)."""
        if path is None:
            return "."
        if isinstance(path, bytes):
            return bytes_decode(path, "utf-8", "surrogateescape")
        return str_copy(path)

    def resolve(path):
        """Absolute path with every existing symlink resolved (like realpath, but unpatchable)."""
        if not path.startswith("/"):
            path = getcwd() + "/" + path
        pending = path.split("/")
        pending.reverse()
        parts = []
        hops = 0
        while pending:
            name = pending.pop()
            if name in ("", "."):
                continue
            if name == "..":
                if parts:
                    parts.pop()
                continue
            candidate = "/" + "/".join(parts + [name])
            try:
                mode = lstat(candidate).st_mode
            except (OSError, ValueError):
                parts.append(name)
                continue
            if mode & type_bits != link_bits:
                parts.append(name)
                continue
            hops += 1
            if hops > 40:
                raise PermissionError("sandbox: too many symlinks")
            target = readlink(candidate)
            if target.startswith("/"):
                parts = []
            extra = target.split("/")
            extra.reverse()
            pending.extend(extra)
        return "/" + "/".join(parts)

    def inside_work(real):
        return real == work_dir or real.startswith(work_prefix)

    def check_write(path):
        real = resolve(as_text(path))
        if not (inside_work(real) or real in write_exact):
            raise PermissionError("sandbox: write access outside the sandbox denied: %r" % (real,))

    def check_read(path):
        real = resolve(as_text(path))
        if not (inside_work(real) or real in read_exact or real.startswith(read_prefixes)):
            raise PermissionError("sandbox: read access outside the sandbox denied: %r" % (real,))

    def check_open(args):
        path, mode, flags = args[0], args[1], args[2]
        if isinstance(path, int) and not isinstance(path, bool):
            return  # an fd the program already holds: its open was checked
        if mode is None and not as_text(path).startswith("/"):
            raise PermissionError("sandbox: os.open with a relative path is not allowed")
        writing = bool((flags or 0) & write_flags) or any(c in (mode or "") for c in "wax+")
        if writing:
            check_write(path)
        else:
            check_read(path)

    def check_import(args):
        name, filename = args[0], args[1]
        if as_text(name) in denied_modules:
            raise PermissionError("sandbox: import of %s is not allowed" % (name,))
        if filename is not None:  # a native extension is about to be dlopen()ed
            real = resolve(as_text(filename))
            if not real.startswith(read_prefixes):
                raise PermissionError("sandbox: native extensions outside the stdlib are not allowed")

    def check_paths(event, args, indices, check):
        for i in indices:
            if i < len(args) and not (isinstance(args[i], int) and not isinstance(args[i], bool)):
                check(args[i])
        j = dir_fd_index.get(event)
        if j is not None and j < len(args) and args[j] not in (None, -1):
            raise PermissionError("sandbox: dir_fd arguments are not allowed")

    def hook(event, args):
        if event == "open":
            check_open(args)
        elif event == "import":
            check_import(args)
        elif event in always_denied or event.startswith(denied_prefixes):
            raise PermissionError("sandbox: %s is not allowed" % (event,))
        else:
            if event in write_ops:
                check_paths(event, args, write_ops[event], check_write)
            if event in read_ops:
                check_paths(event, args, read_ops[event], check_read)

    sys.addaudithook(hook)


def _read_roots():
    roots = set()
    for key in ("stdlib", "platstdlib"):
        roots.add(sysconfig.get_path(key))
    roots.update(p for p in sys.path if p)
    return sorted(os.path.realpath(r) for r in roots if r)


def _main():
    work_dir = os.path.realpath(os.getcwd())
    program = os.path.join(work_dir, sys.argv[1])
    _install_guard(work_dir, _read_roots())
    module = types.ModuleType("__main__")
    module.__file__ = program
    module.__builtins__ = __builtins__
    sys.modules["__main__"] = module
    sys.argv = [program]
    try:
        with open(program, "rb") as handle:
            code = compile(handle.read(), program, "exec")
        exec(code, module.__dict__)
    except SystemExit as exc:
        sys.stderr.write("SystemExit: program exited early with code %r\n" % (exc.code,))
        sys.stderr.flush()
        sys.exit(1)
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        sys.exit(1)

_main()
'''

# The probe runs in a child with layers 1-3 but without the audit hook, to check
# which kernel layers really took effect.
_PROBE_SOURCE = r'''
import errno, os, resource, socket, sys
net = "none"
try:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(1.0)
    try:
        s.connect(("127.0.0.1", 9))
        net = "connected"
    except OSError as exc:
        net = "unreachable" if exc.errno == errno.ENETUNREACH else "reachable"
except OSError:
    net = "nosocket"
print(os.getuid(), net, resource.getrlimit(resource.RLIMIT_AS)[0], resource.getrlimit(resource.RLIMIT_NPROC)[0])
'''


# --------------------------------------------------------------------------- #
# Parent side: privilege plan, child start-up, waiting and classification.
# --------------------------------------------------------------------------- #

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


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


def _rlimit_plan(limits: Limits) -> list[tuple[int, int]]:
    memory = limits.memory_mb * 1024 * 1024
    return [
        (resource.RLIMIT_AS, memory),
        (resource.RLIMIT_FSIZE, limits.max_output_bytes),
        (resource.RLIMIT_NOFILE, limits.max_open_files),
        (resource.RLIMIT_NPROC, limits.max_processes),
        (resource.RLIMIT_CORE, 0),
    ]


def _make_preexec(limits: Limits, privileges: _Privileges):
    """Build the function run in the forked child before exec.

    Everything that allocates or looks things up (ctypes symbols, capability
    structs, the rlimit table) is prepared here in the parent, so the child only
    makes system calls: after fork() in a multi-threaded parent, locks held by
    other threads are never released, and the less the child does the better.
    Failures are tolerated (the layer is simply absent) except a failed uid
    drop, which aborts the start (reported as sandbox_error).
    """
    libc = ctypes.CDLL(None, use_errno=True)
    unshare, prctl, capset = libc.unshare, libc.prctl, libc.capset
    unshare.argtypes = [ctypes.c_int]
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    bit = 1 << _CAP_DAC_READ_SEARCH
    cap_data = (_CapData * 2)(_CapData(bit, bit, bit), _CapData(0, 0, 0))
    is_root = os.geteuid() == 0
    cpu = limits.cpu_seconds()
    rlimits = _rlimit_plan(limits)
    setrlimit, getrlimit, infinity = resource.setrlimit, resource.getrlimit, resource.RLIM_INFINITY
    uid, gid, keep_cap = privileges.uid, privileges.gid, privileges.keep_read_cap

    def clamp(kind, soft, hard):
        current_hard = getrlimit(kind)[1]
        if current_hard != infinity:
            soft, hard = min(soft, current_hard), min(hard, current_hard)
        setrlimit(kind, (soft, hard))

    def preexec() -> None:
        if unshare(_CLONE_NEWNET) != 0 and not is_root:
            unshare(_CLONE_NEWUSER | _CLONE_NEWNET)
        try:
            clamp(resource.RLIMIT_CPU, cpu, cpu + 1)  # soft: SIGXCPU, hard: SIGKILL
        except (OSError, ValueError):
            pass
        for kind, value in rlimits:
            try:
                clamp(kind, value, value)
            except (OSError, ValueError):
                pass
        if uid is None:
            return
        if keep_cap:
            prctl(_PR_SET_KEEPCAPS, 1, 0, 0, 0)
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)
        if keep_cap:
            if capset(ctypes.byref(header), cap_data) != 0:
                raise OSError(ctypes.get_errno(), "capset failed")
            if prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_RAISE, _CAP_DAC_READ_SEARCH, 0, 0) != 0:
                raise OSError(ctypes.get_errno(), "PR_CAP_AMBIENT_RAISE failed")

    return preexec


def _child_env(work_dir: str) -> dict[str, str]:
    return {"PATH": _CHILD_PATH, "HOME": work_dir, "TMPDIR": work_dir,
            "LANG": "C.UTF-8", "PYTHONHASHSEED": "0"}


def _prepare_work_dir(work_dir: str, source: str, privileges: _Privileges) -> None:
    """Write the program and hand the directory to the sandbox user."""
    path = os.path.join(work_dir, _PROGRAM_NAME)
    with open(path, "w", encoding="utf-8", errors="surrogatepass") as handle:
        handle.write(source)
    if privileges.uid is not None:
        os.chown(work_dir, privileges.uid, privileges.gid)
        os.chown(path, privileges.uid, privileges.gid)


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


def _launch(argv_tail: list[str], work_dir: str, io_dir: str, limits: Limits,
            privileges: _Privileges) -> tuple[_RawResult, str, str]:
    """Start the child interpreter, supervise it, return raw result and output file paths."""
    out_path, err_path = os.path.join(io_dir, "stdout"), os.path.join(io_dir, "stderr")
    preexec = _make_preexec(limits, privileges)
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        started = time.monotonic()
        proc = subprocess.Popen(
            [sys.executable, "-I", "-S", "-B", *argv_tail], cwd=work_dir, env=_child_env(work_dir),
            stdin=subprocess.DEVNULL, stdout=out, stderr=err, start_new_session=True,
            close_fds=True, preexec_fn=preexec)
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


def _error_outcome(reason: str, seconds: float = 0.0) -> Outcome:
    return Outcome("sandbox_error", None, "", "", seconds, reason[:_REASON_CHARS])


def run_python(source: str, limits: Limits = Limits()) -> Outcome:
    """Run ``source`` as ``__main__`` in a fresh sandboxed interpreter and report what happened.

    Never raises because of anything the program does; safe to call from many threads.
    """
    privileges = _privileges(limits)
    work_dir = tempfile.mkdtemp(prefix="sbx_work_")
    io_dir = tempfile.mkdtemp(prefix="sbx_io_")
    try:
        _prepare_work_dir(work_dir, source, privileges)
        try:
            raw, out_path, err_path = _launch(["-c", _RUNNER_SOURCE, _PROGRAM_NAME],
                                              work_dir, io_dir, limits, privileges)
        except (OSError, subprocess.SubprocessError) as exc:
            return _error_outcome(f"could not start the sandboxed interpreter: {exc}")
        stdout, out_size = _read_head(out_path, limits.max_output_bytes)
        stderr, err_size = _read_tail(err_path)
        status, reason = _classify(raw, limits, stderr, out_size, err_size)
        return Outcome(status, raw.returncode, stdout, stderr, raw.seconds, reason)
    finally:
        _remove_tree(work_dir)
        _remove_tree(io_dir)


def _probe_kernel_layers(limits: Limits) -> dict:
    """Run the probe script with layers 1-3 (no audit hook) and parse what it saw."""
    privileges = _privileges(limits)
    work_dir = tempfile.mkdtemp(prefix="sbx_probe_")
    io_dir = tempfile.mkdtemp(prefix="sbx_io_")
    try:
        _prepare_work_dir(work_dir, "", privileges)
        raw, out_path, err_path = _launch(["-c", _PROBE_SOURCE], work_dir, io_dir, limits, privileges)
        text, _ = _read_head(out_path, limits.max_output_bytes)
        fields = text.split()
        if raw.returncode != 0 or len(fields) != 4:
            return {"probe_ok": False}
        uid, net, memory, nproc = int(fields[0]), fields[1], int(fields[2]), int(fields[3])
        return {
            "probe_ok": True,
            "uid": uid,
            "network_namespace": net in ("unreachable", "nosocket"),
            "rlimits": memory == limits.memory_mb * 1024 * 1024,
            "nproc_limit": nproc == limits.max_processes,
            "keep_read_cap": privileges.keep_read_cap,
            "wanted_uid": privileges.uid,
        }
    except (OSError, subprocess.SubprocessError, ValueError):
        return {"probe_ok": False}
    finally:
        _remove_tree(work_dir)
        _remove_tree(io_dir)


def _audit_hook_works(limits: Limits) -> bool:
    """Whether the runner's hook really blocks a socket and a write outside the sandbox."""
    program = (
        "import socket\n"
        "try:\n    socket.socket()\nexcept PermissionError:\n    pass\nelse:\n    raise SystemExit(3)\n"
        "try:\n    open('/sbx-audit-probe', 'w')\nexcept PermissionError:\n    pass\nelse:\n    raise SystemExit(3)\n"
    )
    return run_python(program, limits).passed


def protections(limits: Limits = Limits(timeout_s=10.0, memory_mb=256)) -> dict:
    """Which protection layers are active on this machine (for logs and the README).

    Starts two short probe children, so it takes a fraction of a second.
    """
    kernel = _probe_kernel_layers(limits)
    uid_drop = bool(kernel.get("probe_ok")) and kernel.get("wanted_uid") is not None \
        and kernel.get("uid") == kernel.get("wanted_uid")
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
