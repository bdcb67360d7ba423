"""Tests for fr_jax.harness.sandbox: real programs run in real sandboxed children."""

from __future__ import annotations

import concurrent.futures
import json
import os
import resource
import threading
import time
import uuid
import warnings

import pytest

from fr_jax.harness import sandbox
from fr_jax.harness.sandbox import Limits, Outcome, protections, run_python

SMALL = Limits(timeout_s=2, memory_mb=256)
PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNNER_MARKER = b"_install_guard"  # appears in every sandbox child's command line


def sandbox_processes() -> int:
    """Live (non-zombie) processes whose command line is a sandbox runner."""
    count = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                cmdline = handle.read()
            with open(f"/proc/{entry}/stat", "rb") as handle:
                state = handle.read().rsplit(b")", 1)[1].split()[0]
        except OSError:
            continue
        if RUNNER_MARKER in cmdline and state != b"Z":
            count += 1
    return count


def assert_contained(outcome: Outcome) -> None:
    assert not outcome.passed, outcome
    assert outcome.status != "sandbox_error", outcome


# --- ordinary programs --------------------------------------------------------------------------

def test_correct_program_passes():
    out = run_python("def add(a, b):\n    return a + b\nassert add(2, 3) == 5\nprint('ok')\n", SMALL)
    assert out.status == "passed" and out.passed
    assert out.returncode == 0
    assert out.stdout == "ok\n"


def test_stdlib_imports_work():
    src = ("import math, json, re, itertools, functools, collections, heapq, fractions, decimal\n"
           "import random, string, hashlib, datetime, typing, dataclasses, statistics, bisect\n"
           "import tempfile, pathlib\n"
           "fd, name = tempfile.mkstemp(); pathlib.Path(name).write_text('x')\n"
           "assert math.gcd(12, 18) == 6 and json.loads('[1]') == [1]\n")
    out = run_python(src, SMALL)
    assert out.passed, out


def test_failing_assert_is_failed():
    out = run_python("assert 1 + 1 == 3, 'math is broken'\n", SMALL)
    assert out.status == "failed"
    assert out.returncode == 1
    assert "AssertionError" in out.reason and "math is broken" in out.reason


def test_exception_is_failed_with_type_name():
    out = run_python("def f():\n    return {}['missing']\nf()\n", SMALL)
    assert out.status == "failed"
    assert "KeyError" in out.reason
    assert "Traceback" in out.stderr


def test_sys_exit_zero_does_not_pass():
    out = run_python("import sys\nsys.exit(0)\nassert False\n", SMALL)
    assert out.status == "failed"
    assert "SystemExit" in out.reason


def test_infinite_loop_times_out():
    start = time.monotonic()
    out = run_python("while True:\n    pass\n", SMALL)
    elapsed = time.monotonic() - start
    assert out.status == "timeout"
    assert "timeout" in out.reason
    assert elapsed < SMALL.timeout_s + 2


def test_temp_dir_is_removed():
    out = run_python("import os\nprint(os.getcwd())\nopen('scratch.txt', 'w').write('x')\n", SMALL)
    assert out.passed, out
    work_dir = out.stdout.strip()
    assert work_dir and os.path.isabs(work_dir)
    assert not os.path.exists(work_dir)


def test_temp_dir_is_removed_after_timeout():
    out = run_python("import os, sys\nprint(os.getcwd(), flush=True)\nwhile True:\n    pass\n", SMALL)
    assert out.status == "timeout"
    work_dir = out.stdout.strip()
    assert work_dir and not os.path.exists(work_dir)


# --- hostile programs ---------------------------------------------------------------------------

def test_write_outside_temp_dir_is_blocked(tmp_path):
    target = tmp_path / "pwned.txt"
    out = run_python(f"open({str(target)!r}, 'w').write('pwned')\n", SMALL)
    assert_contained(out)
    assert "PermissionError" in out.reason
    assert not target.exists()


def test_write_into_project_dir_is_blocked():
    target = os.path.join(PROJECT_ROOT, f"sandbox_pwned_{uuid.uuid4().hex}.txt")
    try:
        out = run_python(f"with open({target!r}, 'a') as f:\n    f.write('pwned')\n", SMALL)
        assert_contained(out)
        assert not os.path.exists(target)
    finally:
        if os.path.exists(target):
            os.remove(target)


def test_delete_outside_temp_dir_is_blocked(tmp_path):
    sentinel = tmp_path / "sentinel.txt"
    sentinel.write_text("keep me")
    src = (f"import os, shutil\n"
           f"try:\n    os.remove({str(sentinel)!r})\nexcept PermissionError:\n    pass\n"
           f"shutil.rmtree({str(tmp_path)!r})\n")
    out = run_python(src, SMALL)
    assert_contained(out)
    assert sentinel.read_text() == "keep me"


def test_read_project_file_is_blocked():
    setup_py = os.path.join(PROJECT_ROOT, "setup.py")
    assert os.path.exists(setup_py)
    out = run_python(f"print(open({setup_py!r}).read())\n", SMALL)
    assert_contained(out)
    assert "PermissionError" in out.reason
    assert "setup(" not in out.stdout


def test_symlink_escape_is_blocked():
    setup_py = os.path.join(PROJECT_ROOT, "setup.py")
    src = f"import os\nos.symlink({setup_py!r}, 'link')\nprint(open('link').read())\n"
    out = run_python(src, SMALL)
    assert_contained(out)
    assert "setup(" not in out.stdout


def test_monkeypatching_os_does_not_fool_the_hook(tmp_path):
    target = tmp_path / "pwned.txt"
    src = ("import os, posixpath\n"
           "posixpath.realpath = os.path.realpath = lambda p, **k: os.getcwd() + '/x'\n"
           "os.getcwd = lambda: '/'\n"
           f"open({str(target)!r}, 'w').write('pwned')\n")
    out = run_python(src, SMALL)
    assert_contained(out)
    assert not target.exists()


def test_socket_is_blocked():
    src = "import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_STREAM)\ns.connect(('127.0.0.1', 80))\n"
    out = run_python(src, SMALL)
    assert_contained(out)
    assert "PermissionError" in out.reason


def test_fork_bomb_is_contained():
    before = sandbox_processes()
    out = run_python("import os\nwhile True:\n    os.fork()\n", SMALL)
    assert_contained(out)
    assert "PermissionError" in out.reason
    assert sandbox_processes() == before


def test_subprocess_bomb_is_contained():
    before = sandbox_processes()
    src = ("import subprocess, sys\n"
           "while True:\n    subprocess.Popen([sys.executable, '-c', 'while True: pass'])\n")
    out = run_python(src, SMALL)
    assert_contained(out)
    assert "PermissionError" in out.reason
    src = "import os\nwhile True:\n    os.posix_spawn('/bin/sleep', ['sleep', '60'], {})\n"
    out = run_python(src, SMALL)
    assert_contained(out)
    assert sandbox_processes() == before


def test_ctypes_is_blocked():
    out = run_python("import ctypes\nctypes.CDLL(None).system(b'true')\n", SMALL)
    assert_contained(out)
    assert "PermissionError" in out.reason


def test_memory_limit():
    out = run_python("blocks = []\nwhile True:\n    blocks.append(bytearray(50 * 1024 * 1024))\n", SMALL)
    assert out.status == "memory", out


def test_printing_gigabytes_hits_output_limit_quickly():
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.monotonic()
    out = run_python("chunk = 'x' * (1 << 20)\nfor _ in range(4096):\n    print(chunk)\n", SMALL)
    elapsed = time.monotonic() - start
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert out.status == "output_limit", out
    assert elapsed < SMALL.timeout_s
    assert len(out.stdout) <= 4096
    assert rss_after - rss_before < 50 * 1024  # KiB: the parent never buffered the output


def test_huge_file_in_temp_dir_hits_output_limit():
    src = "with open('big.bin', 'wb') as f:\n    for _ in range(64):\n        f.write(b'\\0' * (1 << 20))\n"
    out = run_python(src, Limits(timeout_s=5, memory_mb=256, max_output_bytes=1 << 20))
    assert out.status == "output_limit", out


@pytest.mark.parametrize("module", ["fr_jax", "numpy", "pytest"])
def test_site_packages_and_project_not_importable(module):
    out = run_python(f"import {module}\n", SMALL)
    assert out.status == "failed"
    assert "ModuleNotFoundError" in out.reason


def test_native_extension_from_temp_dir_is_blocked():
    src = ("import importlib.machinery as m, importlib.util as u, math, shutil\n"
           "shutil.copyfile(math.__file__, 'evil.so')\n"
           "spec = u.spec_from_file_location('math', 'evil.so')\n"
           "m.ExtensionFileLoader('math', 'evil.so').create_module(spec)\n")
    out = run_python(src, SMALL)
    assert_contained(out)
    assert "PermissionError" in out.reason


# --- user="none": the audit hook alone still contains network and writes ------------------------

def test_user_none_still_blocks_network_and_writes(tmp_path):
    limits = Limits(timeout_s=2, memory_mb=256, user="none")
    out = run_python("import socket\nsocket.create_connection(('127.0.0.1', 22), timeout=1)\n", limits)
    assert_contained(out)
    assert "PermissionError" in out.reason
    target = tmp_path / "pwned.txt"
    out = run_python(f"open({str(target)!r}, 'w').write('pwned')\n", limits)
    assert_contained(out)
    assert not target.exists()
    out = run_python("import os\nprint(os.getuid())\nassert 2 + 2 == 4\n", limits)
    assert out.passed, out
    assert out.stdout.strip() == str(os.getuid())


# --- layer 3 happens in the runner, not between fork and exec ----------------------------------

_FORK_HOOK_ARMED = threading.Event()


def _warn_like_jax_before_fork() -> None:
    """What JAX registers with os.register_at_fork: warn whenever Python-level fork hooks run."""
    if _FORK_HOOK_ARMED.is_set():
        warnings.warn("os.fork() was called. os.fork() is incompatible with multithreaded code, "
                      "and JAX is multithreaded, so this will likely lead to a deadlock.", RuntimeWarning)


os.register_at_fork(before=_warn_like_jax_before_fork)


def test_no_fork_warning_with_another_thread_alive():
    """Fork hooks run only when CPython forks to run Python code in the child (a preexec_fn);
    with a thread alive that is what can deadlock, so run_python must not trigger them."""
    stop = threading.Event()
    sleeper = threading.Thread(target=stop.wait, args=(30,), daemon=True)
    sleeper.start()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _FORK_HOOK_ARMED.set()
            try:
                assert threading.active_count() > 1
                out = run_python("print('ok')\n", SMALL)
            finally:
                _FORK_HOOK_ARMED.clear()
    finally:
        stop.set()
        sleeper.join()
    assert out.passed, out
    assert [w for w in caught if "fork" in str(w.message)] == []


def test_ctypes_used_by_the_setup_is_not_left_loaded():
    out = run_python("import sys\nassert not [m for m in sys.modules if 'ctypes' in m], sys.modules\n", SMALL)
    assert out.passed, out


def test_program_cannot_fake_a_setup_failure():
    src = "import os\nos.write(2, b'sandbox setup failed: fake\\n')\nos._exit(125)\n"
    out = run_python(src, SMALL)
    assert out.status == "failed", out


_KERNEL_CHECK = """
import decimal, fractions, json, os, sys
assert json.loads('[1]') == [1] and fractions.Fraction(1, 3) * 3 == decimal.Decimal(1)
assert not [m for m in sys.modules if 'ctypes' in m]
assert os.getresuid() == (65534, 65534, 65534) and os.getresgid() == (65534, 65534, 65534)
assert os.getgroups() == []
caps = dict(line.split(':') for line in open('/proc/self/status') if line.startswith('Cap'))
assert int(caps['CapEff'], 16) & ~4 == 0 and int(caps['CapPrm'], 16) & ~4 == 0, caps
assert int(caps['CapInh'], 16) == 0 and int(caps['CapAmb'], 16) == 0, caps
try:
    open(%r, 'a')
except PermissionError:
    print('denied')
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="the uid drop happens only as root")
def test_uid_drop_is_enforced_by_the_kernel(tmp_path):
    """Without the audit hook (internal switch used by protections()), the kernel alone must
    refuse a write to a root-owned file, while the stdlib stays importable."""
    target = tmp_path / "root_owned.txt"
    target.write_text("keep me")
    target.chmod(0o644)
    out, achieved = sandbox._run_sandboxed(_KERNEL_CHECK % str(target), SMALL, audit_hook=False)
    assert out.passed, out
    assert out.stdout == "denied\n"
    assert target.read_text() == "keep me"
    assert achieved["uid"] == 65534


@pytest.mark.skipif(os.geteuid() != 0, reason="the uid drop happens only as root")
def test_failed_uid_drop_is_a_sandbox_error_and_the_program_never_runs(monkeypatch):
    original = sandbox._write_config

    def write_impossible_gid(io_dir, *args):
        original(io_dir, *args)
        path = os.path.join(io_dir, "config.json")
        with open(path) as handle:
            config = json.load(handle)
        config["gid"] = 1 << 40  # os.setgid() in the runner must fail
        with open(path, "w") as handle:
            json.dump(config, handle)

    monkeypatch.setattr(sandbox, "_write_config", write_impossible_gid)
    out = run_python("print('the program ran')\n", SMALL)
    assert out.status == "sandbox_error", out
    assert "sandbox setup failed" in out.reason
    assert "the program ran" not in out.stdout


# --- concurrency --------------------------------------------------------------------------------

def test_concurrent_samples_get_the_right_statuses(tmp_path):
    target = tmp_path / "pwned.txt"
    cases = [
        ("assert sum(range(10)) == 45\n", "passed"),
        ("while True:\n    pass\n", "timeout"),
        ("assert [] == [0]\n", "failed"),
        (f"open({str(target)!r}, 'w')\n", "failed"),
        ("import os\nos.fork()\n", "failed"),
        ("print('y' * (1 << 22))\n", "output_limit"),
        ("x = bytearray(1 << 30)\n", "memory"),
        ("print('hello')\n", "passed"),
    ]
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(cases)) as pool:
        outcomes = list(pool.map(lambda case: run_python(case[0], SMALL), cases))
    assert [o.status for o in outcomes] == [expected for _, expected in cases], outcomes
    assert outcomes[-1].stdout == "hello\n"
    assert not target.exists()


# --- reporting ----------------------------------------------------------------------------------

def test_protections_report():
    report = protections()
    for key in ("network_namespace", "uid_drop", "audit_hook", "rlimits"):
        assert key in report
    assert all(isinstance(value, bool) for value in report.values())
    assert report["audit_hook"] is True
    assert report["rlimits"] is True
    if os.geteuid() == 0:
        assert report["uid_drop"] is True
        assert report["network_namespace"] is True


def test_no_new_privileges_is_set_in_the_child():
    """PR_SET_NO_NEW_PRIVS: even past the hook, exec of a setuid binary gains nothing."""
    from fr_jax.harness import sandbox

    src = ("status = open('/proc/self/status').read()\n"
           "assert 'NoNewPrivs:\\t1' in status, status\n")
    out, achieved = sandbox._run_sandboxed(src, SMALL, audit_hook=False)
    assert out.passed, out
    assert achieved["no_new_privs"] is True
