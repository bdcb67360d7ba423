"""The engine's thread: the one place the Engine is stepped, fed by the HTTP handlers.

Handlers (asyncio, any number) submit and cancel `Job`s through a thread-safe inbox; the
engine thread takes them between decode chunks, steps the engine while any slot is busy,
and hands each job its events on the job's own asyncio queue (loop.call_soon_threadsafe).
A cancelled job (stop string seen, client gone) leaves its slot before the next chunk.
Admission control is here too: more than `slots + max_queue` jobs in flight is a 429.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from typing import Dict, Optional, Sequence

from fr_jax.serving.engine import Engine, Event, Request
from fr_jax.serving.metrics import Metrics
from fr_jax.serving.protocol import ApiError

log = logging.getLogger("fr_jax.serve")
ROUTER = "router"  # the metrics label of a token no expert produced (expert index -1)


class Job:
    """One request on its way: the handler awaits `events` (Event, or an Exception when the
    engine failed); the worker stamps the times the metrics need."""

    def __init__(self, request: Request, loop: asyncio.AbstractEventLoop):
        self.request, self.loop = request, loop
        self.events: asyncio.Queue = asyncio.Queue()
        self.arrived = time.perf_counter()
        self.last_token: Optional[float] = None

    def put(self, item):
        self.loop.call_soon_threadsafe(self.events.put_nowait, item)


class Worker:
    def __init__(self, engine: Engine, metrics: Metrics, max_queue: int,
                 expert_names: Sequence[str] = ()):
        self.engine, self.metrics, self.max_queue = engine, metrics, max_queue
        self.names = list(expert_names)
        self.inbox: "queue.SimpleQueue" = queue.SimpleQueue()
        self.jobs: Dict[int, Job] = {}  # request id -> job, on the engine thread only
        self.in_flight = 0  # submitted, not yet finished or cancelled
        self.lock = threading.Lock()
        self._ids = itertools.count()
        self.ready = threading.Event()  # set once warm-up compiled every program
        self.warmed = threading.Event()  # set when warm-up ended, compiled or `failed`
        self.failed: Optional[BaseException] = None
        self.warm_up_s = 0.0
        self.tokens = 0  # generated, for the shutdown line
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="fr_jax-engine", daemon=True)
        metrics.slots.set(engine.slots)

    # ------------------------------------------------------------ the handlers' side
    def submit(self, job: Job):
        """Queues a job; ApiError 503 before warm-up, 429 when slots and queue are full."""
        if not self.ready.is_set():
            raise ApiError(503, "the server is still compiling its programs; retry shortly",
                           headers={"Retry-After": "5"})
        with self.lock:
            if self.in_flight >= self.engine.slots + self.max_queue:
                raise ApiError(429, f"all {self.engine.slots} slots are busy and "
                               f"{self.max_queue} requests are waiting (serve.max_queue); "
                               "retry later", headers={"Retry-After": "1"})
            self.in_flight += 1
            job.request.id = next(self._ids)
        self.inbox.put(("submit", job, None))

    def cancel(self, job: Job, reason: str = "cancelled"):
        """Frees the job's slot before the next chunk (no-op once it finished); `reason`
        labels it in the metrics (stop: a stop string; cancelled: the client left)."""
        self.inbox.put(("cancel", job, reason))

    # ------------------------------------------------------------ the engine thread
    def start(self):
        self.thread.start()

    def stop(self, timeout: float = 30.0):
        self.stopping.set()
        self.inbox.put(("stop", None, None))
        self.thread.join(timeout)

    def _run(self):
        t0 = time.perf_counter()
        try:
            self.engine.warm_up()
        except Exception as e:  # noqa: BLE001 -- reported by the server, which then stops
            self.failed = e
            self.warmed.set()
            return
        self.warm_up_s = time.perf_counter() - t0
        self.ready.set()
        self.warmed.set()
        while not self.stopping.is_set():
            if not self._take_inbox(block=self.engine.idle):
                continue
            try:
                self._dispatch(self.engine.admit())  # first tokens out before the chunk
                self._dispatch(self.engine.decode())
            except Exception as e:  # noqa: BLE001 -- a failed step must not kill the server
                log.exception("engine step failed; failing its requests")
                self._fail_all(e)

    def _take_inbox(self, block: bool) -> bool:
        """Applies every queued submit / cancel; waits for one when `block`. False when
        there is nothing to step."""
        try:
            items = [self.inbox.get(timeout=0.5)] if block else []
        except queue.Empty:
            return False
        while True:
            try:
                items.append(self.inbox.get_nowait())
            except queue.Empty:
                break
        for what, job, reason in items:
            if what == "submit":
                self.jobs[job.request.id] = job
                try:  # the handler checked it; a refusal here still answers, never kills
                    self.engine.submit(job.request)
                except Exception as e:  # noqa: BLE001
                    job.put(ApiError(400, str(e)))
                    self._forget(job)
            elif what == "cancel" and job.request.id in self.jobs:
                self.engine.cancel(job.request)
                self.metrics.requests.labels(reason).inc()
                self._forget(job)
        self._gauges()
        return not self.engine.idle

    def _dispatch(self, events: Sequence[Event]):
        """Hands each job its events, timing them as the client receives them."""
        now = time.perf_counter()
        m = self.metrics
        for ev in events:
            job = self.jobs.get(ev.request.id)
            if job is None:
                continue
            n = len(ev.tokens)
            if job.last_token is None:
                m.ttft.observe(now - job.arrived)
                m.prompt_tokens.inc(len(ev.request.prompt))
            elif job.last_token < now:  # a chunk's tokens arrive at once: its gap spread evenly
                for _ in range(n):
                    m.itl.observe((now - job.last_token) / n)
            job.last_token = now
            m.generated.inc(n)
            self.tokens += n
            for e in ev.experts:
                m.per_expert.labels(self.names[e] if 0 <= e < len(self.names) else ROUTER).inc()
            if ev.finished:  # its place is free before its client hears it is done
                m.requests.labels(ev.request.finish_reason).inc()
                m.spec_passes.inc(ev.request.spec_passes)
                m.spec_kept.inc(ev.request.spec_accepted)
                self._forget(job)
            job.put(ev)
        self._gauges()

    def _forget(self, job: Job):
        if self.jobs.pop(job.request.id, None) is not None:
            with self.lock:
                self.in_flight -= 1

    def _fail_all(self, error: Exception):
        for job in list(self.jobs.values()):
            self.engine.cancel(job.request)
            self._forget(job)
            job.put(error)
        self.engine.reset()

    def _gauges(self):
        self.metrics.queue.set(len(self.engine.pending))
        self.metrics.active.set(self.engine.active)
