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
"""

from __future__ import annotations

import dataclasses
import json
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

_NOBODY_ID = 65534
_CAP_DAC_READ_SEARCH = 2  # the probe checks it in CapEff; the runner has its own constants
_CONFIG_NAME = "config.json"  # parent -> runner, in the io dir (names fixed in _RUNNER_SOURCE too)
_STATUS_NAME = "status"  # runner setup -> parent, in the io dir
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
import json, os, sys, sysconfig, traceback, types

_CLONE_NEWNET = 0x40000000
_CLONE_NEWUSER = 0x10000000
_CAP_DAC_READ_SEARCH = 2
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
_PR_SET_KEEPCAPS = 8
_PR_SET_NO_NEW_PRIVS = 38
_SETUP_FAILED_EXIT = 125


def _load_config(io_dir):
    """The parent's plan, read from its private io dir while this process still has its rights."""
    with open(os.path.join(io_dir, "config.json"), "rb") as handle:
        return json.loads(handle.read())


def _enter_network_namespace(libc):
    """A new, empty network namespace; without root only inside a new user namespace."""
    if libc.unshare(_CLONE_NEWNET) == 0:
        return True
    return os.geteuid() != 0 and libc.unshare(_CLONE_NEWUSER | _CLONE_NEWNET) == 0


def _apply_rlimits(resource, plan):
    """Lower every limit (never above an existing hard limit); whether all of them took."""
    applied = True
    for kind, soft, hard in plan:
        try:
            current_hard = resource.getrlimit(kind)[1]
            if current_hard != resource.RLIM_INFINITY:
                soft, hard = min(soft, current_hard), min(hard, current_hard)
            resource.setrlimit(kind, (soft, hard))
        except (OSError, ValueError):
            applied = False
    return applied


def _keep_read_capability(ctypes, libc):
    """After setuid (with KEEPCAPS) keep only CAP_DAC_READ_SEARCH, effective and permitted.

    No exec follows, so neither an inheritable nor an ambient capability is needed."""
    bit = 1 << _CAP_DAC_READ_SEARCH
    header = (ctypes.c_uint32 * 2)(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (ctypes.c_uint32 * 6)(bit, bit, 0, 0, 0, 0)  # 2 x (effective, permitted, inheritable)
    if libc.capset(header, data) != 0:
        raise OSError(ctypes.get_errno(), "capset(CAP_DAC_READ_SEARCH) failed")
    libc.prctl(_PR_SET_KEEPCAPS, 0, 0, 0, 0)


def _drop_privileges(ctypes, libc, uid, gid, keep_read_cap):
    """Switch real, effective and saved ids to uid/gid with no supplementary groups; verify it."""
    if keep_read_cap and libc.prctl(_PR_SET_KEEPCAPS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_KEEPCAPS) failed")
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
    if keep_read_cap:
        _keep_read_capability(ctypes, libc)
    if os.getresuid() != (uid, uid, uid) or os.getresgid() != (gid, gid, gid) or os.getgroups():
        raise OSError("the uid/gid drop did not take effect")


def _apply_kernel_layers(config):
    """Layer 3, in this process before any untrusted code: net namespace, rlimits, uid drop.

    ctypes lives only in this frame (and is dropped from sys.modules afterwards)."""
    import ctypes, resource
    libc = ctypes.CDLL(None, use_errno=True)
    libc.unshare.argtypes = [ctypes.c_int]
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    achieved = {"network_namespace": _enter_network_namespace(libc),
                "rlimits": _apply_rlimits(resource, config["rlimits"])}
    # No exec of a setuid binary may ever gain privileges back (the hook also forbids exec).
    achieved["no_new_privs"] = libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0
    if config["uid"] is not None:
        _drop_privileges(ctypes, libc, config["uid"], config["gid"], config["keep_read_cap"])
    achieved["uid"] = os.getuid()
    return achieved


def _forget_ctypes():
    """Make ctypes unreachable from the program: a later ``import ctypes`` starts afresh (and
    its dlopen/calls are denied by the hook)."""
    for name in [n for n in sys.modules if n in ("ctypes", "_ctypes") or n.startswith("ctypes.")]:
        del sys.modules[name]
    import gc
    gc.collect()


def _setup(io_dir):
    """Apply layer 3 and report to the parent through a file only this phase can write.

    The parent trusts an outcome only if the status file says ``ok``; a program cannot fake
    a setup failure (or success): the file is closed before it runs and lies outside its reach.
    Any failure here exits before the program runs, so it never runs unprotected."""
    status = os.open(os.path.join(io_dir, "status"),
                     os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        config = _load_config(io_dir)
        achieved = _apply_kernel_layers(config)
    except BaseException as exc:
        message = "sandbox setup failed: %s: %s" % (type(exc).__name__, exc)
        os.write(status, message.encode("utf-8", "replace"))
        os.write(2, message.encode("utf-8", "replace") + b"\n")
        os._exit(_SETUP_FAILED_EXIT)
    os.write(status, b"ok " + json.dumps(achieved).encode())
    os.close(status)
    _forget_ctypes()
    return config


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
    config = _setup(sys.argv[1])
    work_dir = os.path.realpath(os.getcwd())
    program = os.path.join(work_dir, config["program"])
    if config["audit_hook"]:  # off only for the protections() probe
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

# The probe is run as the program, through the same runner with the same layer-3 setup
# but without the audit hook, to check from inside which kernel layers really took effect.
_PROBE_SOURCE = r'''
import errno, os, resource, socket
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
caps = {}
with open("/proc/self/status") as handle:
    for line in handle:
        if line.startswith("Cap"):
            name, value = line.split(":")
            caps[name] = value.strip()
print(os.getuid(), net, resource.getrlimit(resource.RLIMIT_AS)[0],
      resource.getrlimit(resource.RLIMIT_NPROC)[0], caps.get("CapEff", "0"), caps.get("CapPrm", "0"))
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
    """Which protection layers are active on this machine (for logs and the README).

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
