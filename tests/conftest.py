"""Test setup: an 8-device CPU platform so sharding code paths run without an accelerator,
and the order in which the two xdist workers take the tests."""

import os
import sys

import pytest

from cli_env import FAST_COMPILE_FLAGS, REPO

# Must happen before jax is imported anywhere in the test session.
os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count=8 {FAST_COMPILE_FLAGS}")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# No persistent compilation cache in the test workers themselves (tests/cli_env.py gives one
# to the CLI subprocesses): in three runs of the whole suite, two on this machine and one on
# CI, a worker died of a segfault inside XLA while deserializing a CPU executable it read
# from the shared cache, always at the same fixture. Jit's in-memory cache still serves
# each worker's repeats.
os.environ.pop("JAX_COMPILATION_CACHE_DIR", None)

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


@pytest.fixture(scope="module", autouse=True)
def _free_compiled_programs():
    """Drops every compiled program when a test module is done: a worker runs hundreds of
    modules' programs, and the executables it kept grew until a worker died (CI, a crash
    in the middle of tests/test_cache.py after the speculative tests' many programs)."""
    yield
    if "jax" in sys.modules:
        import gc

        sys.modules["jax"].clear_caches()
        gc.collect()


@pytest.fixture(scope="module")
def sft_file(tmp_path_factory):
    """A small SFT file of the toy world's four domains (160 records): what the fault tests
    train on for a few steps."""
    from fr_jax.harness import toy_world as W

    data = W.make_world_data(200, 4, seed=11)
    path = tmp_path_factory.mktemp("data") / "sft.jsonl"
    W.write_jsonl(str(path), [t.record() for t in W.mixture(
        data.train, {d: 1.0 for d in W.EVAL_DOMAINS}, 160, 3)])
    return path
