"""Several JAX processes as one program (multi-controller JAX), set up from the environment.

On a TPU pod slice every worker runs the same command and JAX finds its peers itself
(`TPU_WORKER_HOSTNAMES`, the TPU metadata). Elsewhere (several processes on one machine,
a GPU cluster without a scheduler JAX knows) the launcher names them:

    JAX_COORDINATOR_ADDRESS=host:port   process 0's address, where the others meet
    JAX_NUM_PROCESSES=N                 how many processes take part
    JAX_PROCESS_ID=i                    this process, 0 <= i < N

(JAX reads the first itself; fr_jax reads the other two and hands them to
`jax.distributed.initialize`.) FR_JAX_HEARTBEAT_TIMEOUT_S (default 100) is how long the
processes wait for one that stopped answering before they stop with a line naming it. Cross-process collectives on CPU go through gloo, JAX's
default.
"""

from __future__ import annotations

import atexit
import json
import os
import sys
import threading
import time

import jax
import numpy as np
from jax.experimental import multihost_utils

from fr_jax.errors import ConfigError

MODES = ("auto", "yes", "no")
DONE = "done"  # the watchdog's beat of a process that finished


def requested() -> bool:
    """Whether the environment describes a launch of several processes."""
    hosts = [h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]
    return bool(os.environ.get("JAX_COORDINATOR_ADDRESS")) or len(hosts) > 1


def _int_env(name: str):
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"{name}={value!r} is not an integer") from None


def initialize(mode: str = "auto") -> bool:
    """Joins the processes of a multi-process launch (`jax.distributed.initialize`), before
    any device is touched: mode auto -- when the environment describes one (`requested`);
    yes -- always (JAX's own cluster detection); no -- never. Returns whether this process
    is part of a multi-process program. Calling it again is harmless."""
    if mode not in MODES:
        raise ConfigError(f"distributed mode {mode!r}: use one of {', '.join(MODES)}")
    if jax.distributed.is_initialized():
        return True
    if mode == "no" or (mode == "auto" and not requested()):
        return False
    n, i = _int_env("JAX_NUM_PROCESSES"), _int_env("JAX_PROCESS_ID")
    if os.environ.get("JAX_COORDINATOR_ADDRESS") and not os.environ.get("TPU_WORKER_HOSTNAMES"):
        if n is None or i is None:
            raise ConfigError("JAX_COORDINATOR_ADDRESS is set but JAX_NUM_PROCESSES and "
                              "JAX_PROCESS_ID are not: set all three on every process (or "
                              "none, on a TPU slice)")
        if not 0 <= i < n:
            raise ConfigError(f"JAX_PROCESS_ID={i} is outside 0..{n - 1} "
                              f"(JAX_NUM_PROCESSES={n})")
    # How long the others wait for a process that stopped answering (killed, its host
    # gone) before they fail, instead of hanging in a collective.
    heartbeat = _int_env("FR_JAX_HEARTBEAT_TIMEOUT_S") or 100
    jax.distributed.initialize(num_processes=n, process_id=i,
                               heartbeat_timeout_seconds=heartbeat)
    _start_watchdog(heartbeat)
    return True


def _stop(message: str):
    """Ends this process at once with one line (no shutdown barrier: a peer is gone)."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    os._exit(1)


def _start_watchdog(timeout_s: float, interval_s: float = 1.0):
    """A thread that beats a counter in the coordination service's key-value store and
    watches the others' counters: a process whose counter stands still for `timeout_s`
    (SIGKILLed, its host lost) stops this one with a line saying so. Without it a survivor
    blocked in a cross-process collective can wait for its dead peer forever."""
    from jax._src import distributed as jax_distributed  # the client JAX connected

    client = jax_distributed.global_state.client
    me, n = jax.process_index(), jax.process_count()
    stop = threading.Event()

    def watch():
        beat, last = 0, {p: (None, time.monotonic()) for p in range(n) if p != me}
        while not stop.is_set():
            beat += 1
            try:
                client.key_value_set(f"fr_jax/alive/{me}", str(beat), allow_overwrite=True)
                values = {}
                for p in last:
                    try:
                        values[p] = client.key_value_try_get(f"fr_jax/alive/{p}")
                    except Exception:  # not written yet
                        values[p] = None
            except Exception as e:  # the coordinator (process 0) is gone
                _stop(f"process {me} lost the coordinator ({type(e).__name__}); the launch "
                      "is broken: re-run the same command on every host to resume from the "
                      "last complete checkpoint")
            now = time.monotonic()
            for p, v in values.items():
                if v == DONE:  # that process finished its work and is exiting
                    last[p] = (v, float("inf"))
                elif v != last[p][0]:
                    last[p] = (v, now)
                elif now - last[p][1] > timeout_s:
                    _stop(f"process {p} stopped answering {timeout_s:.0f} s ago (killed, or "
                          f"its host lost); process {me} stops too. Re-run the same command "
                          "on every host: training resumes from the last complete checkpoint")
            stop.wait(interval_s)

    thread = threading.Thread(target=watch, name="fr_jax-watchdog", daemon=True)
    thread.start()

    def finish():
        # At exit, before JAX's own shutdown (atexit runs last-registered first): the
        # others stop watching this process, which may now wait for them at JAX's
        # shutdown barrier, and the thread is out of the client before it is torn down.
        stop.set()
        thread.join()
        try:
            client.key_value_set(f"fr_jax/alive/{me}", DONE, allow_overwrite=True)
        except Exception:  # the coordinator is gone already: nothing to tell
            pass

    atexit.register(finish)


def is_main() -> bool:
    """Process 0: the one that writes logs, TensorBoard, exports and reports."""
    return jax.process_index() == 0


def all_agree(flag: bool) -> bool:
    """True when `flag` holds on every process (each process's own answer otherwise):
    the processes of a program must take the same branch into any collective."""
    if jax.process_count() == 1:
        return bool(flag)
    return bool(np.all(multihost_utils.process_allgather(np.asarray([bool(flag)]))))


def to_global(x: np.ndarray, sharding) -> jax.Array:
    """A host array every process holds whole -> a jax.Array with `sharding`, each process
    filling only its own devices' shards."""
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def fetch(tree):
    """Device arrays -> numpy on every process, also when their shards live on several
    processes (then gathered across them)."""
    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable and \
                not x.is_fully_replicated:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(jax.device_get(x))
    return jax.tree.map(one, tree)


def barrier(name: str):
    """Every process waits here until all have arrived (a no-op in one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def gather(obj) -> list:
    """Every process's `obj` (anything JSON can carry), in process order, on every
    process (a collective)."""
    if jax.process_count() == 1:
        return [obj]
    data = np.frombuffer(json.dumps(obj).encode(), np.uint8)
    sizes = multihost_utils.process_allgather(np.asarray([data.size], np.int64)).ravel()
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[:data.size] = data
    rows = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(sizes), -1)
    return [json.loads(bytes(row[:n]).decode()) for row, n in zip(rows, sizes)]


def local_view(x: jax.Array) -> np.ndarray:
    """A global array's values on this process's devices, in an array of its global shape
    (elsewhere zeros): what a process reads back of a computation over its own rows,
    without gathering the others'."""
    out = np.zeros(x.shape, x.dtype)
    for shard in x.addressable_shards:
        out[shard.index] = np.asarray(shard.data)
    return out
