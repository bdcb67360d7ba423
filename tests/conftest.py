"""Test setup: an 8-device CPU platform so sharding code paths run without an accelerator,
one on-disk compilation cache, and the order in which the two xdist workers take the tests."""

import os
import sys

from cli_env import FAST_COMPILE_FLAGS, REPO

# Must happen before jax is imported anywhere in the test session.
os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count=8 {FAST_COMPILE_FLAGS}")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# One on-disk compilation cache for both workers and every CLI subprocess they start: the
# suite compiles the same small programs many times (each CLI run and each fresh jit closure
# would otherwise compile from scratch). It lives in the checkout, so reruns start warm.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(REPO, ".jax_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(4 * 2**30))  # LRU beyond 4 GiB

# benchmarks/ (the PyTorch reference decode) is imported by the tests.
sys.path.insert(0, REPO)


# The longest tests, longest first: each starts at once on a worker of its own.
FIRST = ("test_quick_demo_end_to_end", "test_pipeline_is_deterministic")


def pytest_collection_modifyitems(items):
    """Orders the tests for `--dist worksteal`, which gives worker i the i-th contiguous
    share of this list and lets an idle worker steal from the end of a busy one's: longest
    first within each share (FIRST, then the other `slow` tests, then the rest, in file
    order), the long ones dealt out in turn, so no worker ends with a long test alone."""
    def rank(item):
        if item.originalname in FIRST:
            return FIRST.index(item.originalname)
        return len(FIRST) + (0 if item.get_closest_marker("slow") else 1)
    ordered = sorted(items, key=rank)  # stable
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    items[:] = [it for i in range(workers) for it in ordered[i::workers]]
