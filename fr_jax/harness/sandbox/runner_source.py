"""The programs the child interpreter executes, kept as source text.

``_RUNNER_SOURCE`` is executed by the child interpreter with ``-c`` before the program;
everything it needs is captured in closures before the untrusted code runs.  It is text,
not an imported module, because the child runs ``python -I -S`` where neither
site-packages nor this project are importable."""

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
