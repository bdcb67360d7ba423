"""The HTTP face of the engine: an OpenAI-compatible FastAPI app.

    POST /v1/chat/completions   POST /v1/completions   (streamed as server-sent events)
    GET  /v1/models             GET  /health (503 until warm-up is done)   GET /metrics

Every answer carries the experts behind its tokens: `choices[0].fr_jax` = {"experts",
"expert_names", "token_ids"} (per streamed chunk: the chunk's own tokens). Every error is
OpenAI's error object (fr_jax.serving.protocol.ApiError); a request never reaches the engine
before its body, fields, prompt length and answer budget are checked.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import secrets
import time
from typing import Callable, List, Sequence

from fastapi import FastAPI, Request as HttpRequest
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from fr_jax.runtime.errors import FrJaxError
from fr_jax.serving.detokenize import TextStream
from fr_jax.serving.engine import Request
from fr_jax.serving.metrics import Metrics
from fr_jax.serving.protocol import (CHAT, COMPLETION, ApiError, Call, choice, envelope,
                                     parse_call, sse, usage)
from fr_jax.serving.worker import Job, Worker


@dataclasses.dataclass
class Service:
    """What the app serves with. encode(prompt, chat) -> token ids (chat: a message list
    through the chat template; else text); decode(ids) -> text without special tokens.
    limits: the serve config section; defaults: decode's temperature / top_k / top_p."""

    worker: Worker
    encode: Callable
    decode: Callable[[List[int]], str]
    model: str
    expert_names: Sequence[str]
    limits: object
    defaults: object
    vocab: int
    api_key: str = ""
    metrics: Metrics = dataclasses.field(default_factory=Metrics)
    draining: bool = False
    started: int = dataclasses.field(default_factory=lambda: int(time.time()))

    @property
    def engine(self):
        return self.worker.engine


def make_app(service: Service) -> FastAPI:
    app = FastAPI(title="fr_jax", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service

    @app.exception_handler(ApiError)
    async def api_error(_, e: ApiError):
        service.metrics.rejected.labels(str(e.status)).inc()
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(HTTPException)
    async def http_error(_, e: HTTPException):  # unknown route, wrong method
        return await api_error(_, ApiError(e.status_code, str(e.detail)))

    @app.exception_handler(Exception)
    async def crash(_, e: Exception):
        return await api_error(_, ApiError(500, f"internal error: {type(e).__name__}: {e}"))

    @app.get("/health")
    async def health():
        ready = service.worker.ready.is_set() and not service.draining
        status = "ok" if ready else ("draining" if service.draining else "warming up")
        return JSONResponse({"status": status}, status_code=200 if ready else 503)

    @app.get("/metrics")
    async def metrics():
        return Response(service.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models(request: HttpRequest):
        authorize(service, request)
        return {"object": "list", "data": [{
            "id": service.model, "object": "model", "created": service.started,
            "owned_by": "fr_jax", "max_model_len": service.engine.cache_len,
            "fr_jax": {"expert_names": list(service.expert_names),
                       "slots": service.engine.slots}}]}

    @app.post("/v1/chat/completions")
    async def chat(request: HttpRequest):
        return await complete(service, CHAT, request)

    @app.post("/v1/completions")
    async def completions(request: HttpRequest):
        return await complete(service, COMPLETION, request)

    return app


def authorize(service: Service, request: HttpRequest):
    if not service.api_key:
        return
    given = request.headers.get("authorization", "")
    scheme, _, key = given.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(),
                                                            service.api_key.encode()):
        raise ApiError(401, "a valid API key is required: send 'Authorization: Bearer KEY' "
                       "(the server's serve.api_key / FR_JAX_API_KEY)", code="invalid_api_key")


async def read_body(request: HttpRequest, limit: int) -> bytes:
    too_big = ApiError(413, f"the request body is larger than {limit} bytes "
                       "(serve.max_body_bytes)")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise too_big
    parts, n = [], 0
    async for part in request.stream():
        n += len(part)
        if n > limit:
            raise too_big
        parts.append(part)
    return b"".join(parts)


def to_request(service: Service, call: Call) -> Request:
    """The engine request of a checked call: prompt ids, answer budget, sampling."""
    where = "messages" if call.kind == CHAT else "prompt"
    if isinstance(call.prompt, list) and call.prompt and isinstance(call.prompt[0], int):
        ids = call.prompt
        if max(ids) >= service.vocab:
            raise ApiError(400, f"'prompt' has token id {max(ids)}; the vocabulary has "
                           f"{service.vocab}", param="prompt")
    else:
        try:
            ids = service.encode(call.prompt, call.kind == CHAT)
        except FrJaxError as e:  # no chat template
            raise ApiError(400, str(e), param=where) from None
    if not ids:
        raise ApiError(400, f"'{where}' encodes to no tokens", param=where)
    engine, limits = service.engine, service.limits
    longest = min(limits.max_prompt_tokens or engine.buckets[-1], engine.buckets[-1])
    if len(ids) > longest:
        raise ApiError(400, f"the prompt has {len(ids)} tokens; this server takes at most "
                       f"{longest}", param=where, code="context_length_exceeded")
    room = engine.room(len(ids))
    if call.max_tokens is not None and call.max_tokens > limits.max_tokens:
        raise ApiError(400, f"'max_tokens' is {call.max_tokens}; this server gives at most "
                       f"{limits.max_tokens} (serve.max_tokens)", param="max_tokens")
    if call.max_tokens is not None and call.max_tokens > room:
        raise ApiError(400, f"a prompt of {len(ids)} tokens leaves room for {room} new tokens "
                       f"in the cache ({engine.cache_len} slots); ask for at most {room}",
                       param="max_tokens", code="context_length_exceeded")
    if room < 1:
        raise ApiError(400, f"a prompt of {len(ids)} tokens leaves no room for an answer",
                       param=where, code="context_length_exceeded")
    d = service.defaults
    seed = call.seed if call.seed is not None else secrets.randbits(31)
    return Request(ids, call.max_tokens or min(limits.max_tokens, room),
                   temperature=d.temperature if call.temperature is None else call.temperature,
                   top_k=d.top_k if call.top_k is None else call.top_k,
                   top_p=d.top_p if call.top_p is None else call.top_p,
                   seed=seed % 2 ** 31, stop_ids=tuple(call.stop_token_ids),
                   ignore_eos=call.ignore_eos)


async def complete(service: Service, kind: str, http: HttpRequest):
    if service.draining:
        raise ApiError(503, "the server is shutting down; send the request elsewhere")
    authorize(service, http)
    call = parse_call(kind, await read_body(http, service.limits.max_body_bytes),
                      service.limits)
    if call.model != service.model:
        raise ApiError(404, f"model '{call.model}' is not served here; this server serves "
                       f"'{service.model}' (GET /v1/models)", param="model",
                       code="model_not_found")
    job = Job(to_request(service, call), asyncio.get_running_loop())
    service.worker.submit(job)
    rid = ("chatcmpl-" if kind == CHAT else "cmpl-") + secrets.token_hex(12)
    if call.stream:
        return StreamingResponse(streamed(service, call, job, rid),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    watcher = asyncio.create_task(cancel_on_disconnect(service, http, job))
    try:
        text, tokens, experts, finish = [], [], [], None
        async for delta, t, e, finish in pieces(service, job, call):
            text.append(delta)
            tokens += t
            experts += e
    finally:
        watcher.cancel()
        if finish is None:
            service.worker.cancel(job)
    return envelope(kind, rid, int(time.time()), service.model,
                    [choice(kind, "".join(text), finish, extension(service, tokens, experts))],
                    usage_counts=usage(len(job.request.prompt), len(tokens)))


def extension(service: Service, tokens, experts) -> dict:
    return {"experts": list(experts), "expert_names": list(service.expert_names),
            "token_ids": list(tokens)}


async def pieces(service: Service, job: Job, call: Call):
    """(text delta, tokens, experts, finish_reason or None) as the engine's events come; a
    stop string cancels the request at once."""
    text = TextStream(service.decode, call.stop)
    while True:
        ev = await job.events.get()
        if isinstance(ev, Exception):
            raise ev if isinstance(ev, ApiError) else ApiError(500, f"decoding failed: {ev}")
        delta, keep = text.feed(ev.tokens)
        finish = None
        if text.stopped:
            if not ev.finished:
                service.worker.cancel(job, "stop")
            finish = "stop"
        elif ev.finished:
            finish = job.request.finish_reason
            delta += text.flush()
        yield delta, ev.tokens[:keep], ev.experts[:keep], finish
        if finish:
            return


async def cancel_on_disconnect(service: Service, http: HttpRequest, job: Job):
    """Waits for the client to go away (the body is read: the next ASGI message is the
    disconnect) and frees the job's slot then."""
    while True:
        message = await http.receive()
        if message["type"] == "http.disconnect":
            service.worker.cancel(job)
            return


async def streamed(service: Service, call: Call, job: Job, rid: str):
    """The server-sent events of a streamed answer; a client that leaves cancels the job
    (Starlette cancels this generator on disconnect)."""
    created, kind, n_tokens, finish = int(time.time()), call.kind, 0, None
    first = True
    try:
        async for delta, tokens, experts, finish in pieces(service, job, call):
            n_tokens += len(tokens)
            part = choice(kind, delta, finish, extension(service, tokens, experts),
                          delta=True, first=first)
            first = False
            yield sse(envelope(kind, rid, created, service.model, [part], stream=True))
        if call.include_usage:
            yield sse(envelope(kind, rid, created, service.model, [], stream=True,
                               usage_counts=usage(len(job.request.prompt), n_tokens)))
    except ApiError as e:  # the status line is sent: the error goes in the stream
        yield sse(e.body())
    finally:
        if finish is None:
            service.worker.cancel(job)
    yield sse("[DONE]")
