"""The engine's thread (fr_jax/serving/worker.py) on a scripted engine: no request before
warm-up (503), admission control (429 beyond slots + queue), events handed to each job's
asyncio queue in order, a cancel freeing the slot, a failed step failing its requests but
not the thread, a failed warm-up reported."""

import asyncio
import collections

import pytest

from fr_jax.serving.engine import Event, Request
from fr_jax.serving.metrics import Metrics
from fr_jax.serving.protocol import ApiError
from fr_jax.serving.worker import Job, Worker


class ScriptedEngine:
    """Each busy slot gets one token per decode (its request id * 10 + count), expert 0;
    `fail_next` makes the next decode raise."""

    def __init__(self, slots=2, warm_error=None):
        self.slots, self.warm_error, self.fail_next = slots, warm_error, False
        self.pending, self.requests = collections.deque(), [None] * slots

    def warm_up(self):
        if self.warm_error:
            raise self.warm_error

    @property
    def active(self):
        return sum(r is not None for r in self.requests)

    @property
    def idle(self):
        return not self.pending and self.active == 0

    def submit(self, r):
        self.pending.append(r)

    def cancel(self, r):
        r.finish_reason = "cancelled"
        if r in self.pending:
            self.pending.remove(r)
        self.requests = [None if x is r else x for x in self.requests]

    def reset(self):
        self.pending.clear()
        self.requests = [None] * self.slots

    def admit(self):
        while self.pending and None in self.requests:
            self.requests[self.requests.index(None)] = self.pending.popleft()
        return []

    def decode(self):
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("device lost")
        out = []
        for i, r in enumerate(self.requests):
            if r is not None:
                r.tokens.append(r.id * 10 + len(r.tokens))
                if len(r.tokens) >= r.max_tokens:
                    r.finish_reason = "length"
                    self.requests[i] = None
                out.append(Event(r, r.tokens[-1:], [0], r.finished))
        return out


async def _collect(job):
    tokens = []
    while True:
        ev = await asyncio.wait_for(job.events.get(), 10)
        if isinstance(ev, Exception):
            return ev
        tokens += ev.tokens
        if ev.finished:
            return tokens


def test_admission_events_and_cancel():
    engine = ScriptedEngine(slots=2)
    worker = Worker(engine, Metrics(), max_queue=1, expert_names=["a"])

    async def go():
        loop = asyncio.get_running_loop()
        early = Job(Request([1], 3), loop)
        with pytest.raises(ApiError) as e:
            worker.submit(early)  # not warmed up yet
        assert e.value.status == 503 and "Retry-After" in e.value.headers
        worker.start()
        await loop.run_in_executor(None, worker.ready.wait, 10)
        jobs = [Job(Request([1], 3), loop) for _ in range(3)]
        for j in jobs:
            worker.submit(j)
        with pytest.raises(ApiError) as e:  # 2 slots + 1 waiting place are taken
            worker.submit(Job(Request([1], 3), loop))
        assert e.value.status == 429
        worker.cancel(jobs[2], "cancelled")
        got = [await _collect(j) for j in jobs[:2]]
        assert got == [[j.request.id * 10 + k for k in range(3)] for j in jobs[:2]]
        assert worker.in_flight == 0 and engine.idle
        again = Job(Request([1], 2), loop)  # the freed places take new requests
        worker.submit(again)
        assert await _collect(again) == [again.request.id * 10, again.request.id * 10 + 1]
        engine.fail_next = True  # a failed step fails its requests; the thread goes on
        doomed = Job(Request([1], 5), loop)
        worker.submit(doomed)
        assert isinstance(await _collect(doomed), RuntimeError)
        last = Job(Request([1], 1), loop)
        worker.submit(last)
        assert await _collect(last) == [last.request.id * 10]

    try:
        asyncio.run(go())
    finally:
        worker.stop(5)
    assert worker.tokens == 3 + 3 + 2 + 1 and not worker.thread.is_alive()
    text = worker.metrics.render().decode()
    assert 'fr_jax_requests_total{finish_reason="cancelled"} 1.0' in text
    assert 'fr_jax_expert_tokens_total{expert="a"} 9.0' in text


def test_a_failed_warm_up_is_reported_not_hung():
    worker = Worker(ScriptedEngine(warm_error=MemoryError("out of HBM")), Metrics(), 4)
    worker.start()
    assert worker.warmed.wait(10) and not worker.ready.is_set()
    assert isinstance(worker.failed, MemoryError)
    worker.stop(5)
