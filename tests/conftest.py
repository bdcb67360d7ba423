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


def pytest_collection_modifyitems(items):
    """Longest first, so that neither worker is left with a long test at the end: the
    reduced demo run (one fixture, ~10 minutes), then the other `slow` tests, then the rest,
    each in file order."""
    def rank(item):
        return 0 if "quick_run" in item.fixturenames else 1 if item.get_closest_marker(
            "slow") else 2
    items.sort(key=rank)  # stable
