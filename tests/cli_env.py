"""The environment of the tests that run fr_jax's command lines as subprocesses."""

import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# XLA's CPU backend without LLVM's optimisation passes: the suite is compile-bound (tiny
# models, many programs), and this compiles ~1.4x faster. Every comparison in the suite is
# between programs compiled the same way, or against PyTorch / recorded values with the
# tolerances a reduction order explains.
FAST_COMPILE_FLAGS = "--xla_backend_optimization_level=0"


# One on-disk compilation cache for every CLI subprocess of the suite: each run of a command
# line would otherwise compile the same small programs from scratch. It lives in the
# checkout, so reruns start warm.
COMPILATION_CACHE = {
    "JAX_COMPILATION_CACHE_DIR": os.path.join(REPO, ".jax_cache"),
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.2",
    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    "JAX_COMPILATION_CACHE_MAX_SIZE": str(4 * 2**30),  # LRU beyond 4 GiB
}


def one_device_env(home, fast_compile: bool = True) -> dict:
    """os.environ for a CLI subprocess: one CPU device (as a user would run it), fr_jax's
    home (bundled-world data, caches) in `home`, and this checkout on the path.
    `fast_compile=False` for runs of thousands of steps (the demo pipeline): there LLVM's
    optimised code wins back far more than its compile time (its training steps ran ~5x
    slower at level 0)."""
    env = dict(os.environ, FR_JAX_HOME=str(home), PYTHONPATH=REPO, **COMPILATION_CACHE)
    env["XLA_FLAGS"] = FAST_COMPILE_FLAGS if fast_compile else ""
    return env
