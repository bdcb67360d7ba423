"""Several JAX processes as one program (multi-controller JAX), set up from the environment.

On a TPU pod slice every worker runs the same command and JAX finds its peers itself
(`TPU_WORKER_HOSTNAMES`, the TPU metadata). Elsewhere (several processes on one machine,
a GPU cluster without a scheduler JAX knows) the launcher names them:

    JAX_COORDINATOR_ADDRESS=host:port   process 0's address, where the others meet
    JAX_NUM_PROCESSES=N                 how many processes take part
    JAX_PROCESS_ID=i                    this process, 0 <= i < N

(JAX reads the first itself; fr_jax reads the other two and hands them to
`jax.distributed.initialize`; the last two without the first are refused, since the process
would run alone.) Two waits are bounded, each ending in one line that names who is missing:

    FR_JAX_INIT_TIMEOUT_S (default 300, JAX's)  how long a process waits at the start for
                                                the others to connect
    FR_JAX_HEARTBEAT_TIMEOUT_S (default 100)    how long the processes wait for one that
                                                stopped answering mid-run

Cross-process collectives on CPU go through gloo, JAX's default.
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import os
import socket
import sys
import threading
import time
from typing import Optional

import jax
import numpy as np
from jax.experimental import multihost_utils

from fr_jax.config import CHOICES
from fr_jax.runtime.errors import ConfigError

MODES = CHOICES["train.distributed"]  # declared once, in the config's row
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


def _seconds(name: str, default: int) -> int:
    value = _int_env(name)
    if value is None:
        return default
    if value <= 0:
        raise ConfigError(f"{name}={value}: give a number of seconds above 0")
    return value


def _refuse_alone(n, i):
    """JAX_NUM_PROCESSES / JAX_PROCESS_ID that describe one of several processes, with no
    coordinator to meet the others at: refused, or this process would quietly run alone."""
    if (n is None or n == 1) and (i is None or i == 0):
        return
    given = " and ".join(f"{k}={v}" for k, v in (("JAX_NUM_PROCESSES", n),
                                                   ("JAX_PROCESS_ID", i)) if v is not None)
    raise ConfigError(f"{given} without JAX_COORDINATOR_ADDRESS: this process would run alone. "
                      "Set JAX_COORDINATOR_ADDRESS=host:port (process 0's address) on every "
                      "process, or unset JAX_NUM_PROCESSES and JAX_PROCESS_ID to run one process")


def initialize(mode: str = "auto") -> bool:
    """Joins the processes of a multi-process launch (`jax.distributed.initialize`), before
    any device is touched: mode auto -- when the environment describes one (`requested`);
    yes -- always (JAX's own cluster detection); no -- never. Returns whether this process
    is part of a multi-process program. Calling it again is harmless. A launch whose
    processes do not all connect within FR_JAX_INIT_TIMEOUT_S raises ConfigError naming
    the missing ones."""
    if mode not in MODES:
        raise ConfigError(f"distributed mode {mode!r}: use one of {', '.join(MODES)}")
    if jax.distributed.is_initialized():
        return True
    if mode == "no":
        return False
    n, i = _int_env("JAX_NUM_PROCESSES"), _int_env("JAX_PROCESS_ID")
    if mode == "auto" and not requested():
        _refuse_alone(n, i)
        return False
    if n is not None and n < 1:
        raise ConfigError(f"JAX_NUM_PROCESSES={n}: give the number of processes (1 or more)")
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
    heartbeat = _seconds("FR_JAX_HEARTBEAT_TIMEOUT_S", 100)
    _join(_Launch(os.environ.get("JAX_COORDINATOR_ADDRESS"), n, i,
                  _seconds("FR_JAX_INIT_TIMEOUT_S", 300)), heartbeat)
    _start_watchdog(heartbeat)
    return True


def _processes(ids, some: bool = False) -> str:
    """'process 2', 'processes 1 and 2', 'processes 1 to 7'; `some`: any of them may be
    the missing one(s)."""
    ids = list(ids)
    if len(ids) == 1:
        return f"process {ids[0]}"
    if len(ids) > 3 and ids == list(range(ids[0], ids[-1] + 1)):
        named = f"{ids[0]} to {ids[-1]}"
    else:
        named = ", ".join(map(str, ids[:-1])) + f" and {ids[-1]}"
    return f"processes {named}" + (" (all or some of them: JAX does not say which)" * some)


def _answers(address: str) -> bool:
    """Whether anything accepts a connection at host:port."""
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=2).close()
        return True
    except (OSError, ValueError):
        return False


@dataclasses.dataclass(frozen=True)
class _Launch:
    """What this process knows of the launch it joins (None: left to JAX's cluster
    detection, e.g. on a TPU slice)."""

    address: Optional[str]
    n: Optional[int]
    i: Optional[int]
    timeout: int

    @property
    def named(self) -> bool:
        return bool(self.address) and self.n is not None and self.i is not None

    def waiting(self) -> str:
        wait = f"waiting up to {self.timeout} s (FR_JAX_INIT_TIMEOUT_S)"
        if not self.named:
            return f"joining a multi-process launch found by JAX: {wait} for every process"
        if self.i == 0:
            others = _processes(range(1, self.n)) if self.n > 1 else "no other process"
            return (f"process 0 of {self.n}: coordinator at {self.address}, {wait} for "
                    f"{others} to connect")
        return (f"process {self.i} of {self.n}: {wait} for the coordinator at "
                f"{self.address} (process 0) and the other processes")

    def missing(self) -> str:
        """The line for a launch that did not come together in time."""
        within = f"within {self.timeout} s (FR_JAX_INIT_TIMEOUT_S)"
        if not self.named:
            return (f"the processes of this launch did not all connect {within}: run the "
                    "same command on every host")
        others = [p for p in range(1, self.n) if p != self.i]
        if self.i == 0 and not others:
            what = f"its own coordinator at {self.address} did not let it join {within}"
        elif self.i == 0:
            what = (f"{_processes(others, some=True)} never connected to the coordinator "
                    f"at {self.address} {within}")
        elif not _answers(self.address):
            what = f"the coordinator at {self.address} (process 0) did not answer {within}"
        elif others:
            what = (f"the coordinator at {self.address} answers, but "
                    f"{_processes(others, some=True)} never connected {within}")
        else:
            what = (f"something answers at {self.address} but did not let this process join "
                    f"{within} (is it process 0 of this launch?)")
        return (f"process {self.i} of {self.n}: {what}. Start every process with "
                f"JAX_COORDINATOR_ADDRESS={self.address} and JAX_NUM_PROCESSES={self.n}, "
                f"each with its own JAX_PROCESS_ID in 0..{self.n - 1}")


def _join(launch: _Launch, heartbeat: int):
    """`jax.distributed.initialize`, saying first what it waits for, and given up after
    launch.timeout with ConfigError naming who is missing. It runs in a thread because
    JAX's own timeout aborts the whole process with a C++ stack trace; JAX's limit stays
    as a backstop, later than ours."""
    print(launch.waiting(), file=sys.stderr, flush=True)
    done, failed = threading.Event(), []

    def connect():
        try:
            jax.distributed.initialize(num_processes=launch.n, process_id=launch.i,
                                       initialization_timeout=launch.timeout + 60,
                                       heartbeat_timeout_seconds=heartbeat)
        except Exception as e:
            failed.append(e)
        finally:
            done.set()

    threading.Thread(target=connect, name="fr_jax-join", daemon=True).start()
    try:
        joined = done.wait(launch.timeout)
    except KeyboardInterrupt:
        _abandon(130)
        raise
    if not joined:
        _abandon(1)
        raise ConfigError(launch.missing())
    if failed and "Failed to start RPC server" in str(failed[0]):
        raise ConfigError(f"process 0 cannot start the coordinator at {launch.address}: "
                          "its port is taken (an earlier launch still running?) or the "
                          "address is not this host's. Give every process the same free "
                          "address") from None
    if failed:
        raise failed[0]


def _abandon(code: int):
    """Makes this process end without JAX's shutdown, which cannot undo a connection
    attempt still running in its thread: it would wait for seconds and then print the
    coordination service's logs below the one line that says what went wrong."""
    def hard_exit():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)

    atexit.register(hard_exit)  # atexit runs last-registered first: before JAX's own


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
