"""The OpenAI wire format: request bodies checked field by field, response and error objects.

`parse_call` turns the JSON body of `POST /v1/chat/completions` or `/v1/completions` into a
`Call` (what to decode, how to sample, when to stop) or raises `ApiError` -- an HTTP status and
OpenAI's error object naming the field (`{"error": {"message", "type", "param", "code"}}`).
Every field a body may carry is in one table (`FIELDS`): a field not there, or there but not
supported with the value given (`n: 2`, `logprobs: true`), is refused by name rather than
silently ignored.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

CHAT, COMPLETION = "chat.completion", "text_completion"
ROLES = ("system", "user", "assistant", "developer")


class ApiError(Exception):
    """An HTTP error with OpenAI's error object (status 400 bad request, 401 key, 404 model,
    413 body too large, 429 busy, 503 not ready / draining)."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error",
             404: "not_found_error", 413: "invalid_request_error", 429: "rate_limit_error",
             503: "service_unavailable"}

    def __init__(self, status: int, message: str, param: Optional[str] = None,
                 code: Optional[str] = None, headers: Optional[Dict[str, str]] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "error"),
                          "param": self.param, "code": self.code}}


@dataclasses.dataclass
class Call:
    """One parsed request. prompt: chat messages [{"role", "content"}] (kind CHAT), text or
    token ids (kind COMPLETION); None fields take the server's defaults."""

    kind: str
    model: str
    prompt: Union[str, List[dict], List[int]]
    max_tokens: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    seed: Optional[int] = None
    stop: Tuple[str, ...] = ()
    stop_token_ids: Tuple[int, ...] = ()
    ignore_eos: bool = False
    stream: bool = False
    include_usage: bool = False


def _bad(field: str, what: str, value) -> ApiError:
    shown = json.dumps(value)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    return ApiError(400, f"'{field}' must be {what}, got {shown}", param=field)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


def _int(lo: int, hi: Optional[int] = None) -> Callable:
    what = f"an integer >= {lo}" + (f" and <= {hi}" if hi is not None else "")

    def check(field, v, _):
        if not _is_int(v) or v < lo or (hi is not None and v > hi):
            raise _bad(field, what, v)
        return v
    return check


def _num(lo: float, hi: float, open_lo: bool = False) -> Callable:
    what = f"a number {'>' if open_lo else '>='} {lo:g} and <= {hi:g}"

    def check(field, v, _):
        if not _is_num(v) or v > hi or v < lo or (open_lo and v == lo):
            raise _bad(field, what, v)
        return float(v)
    return check


def _only(value, why: str) -> Callable:
    """A field fr_jax knows but supports at one value only (its OpenAI default)."""
    def check(field, v, _):
        if v != value or isinstance(v, bool) != isinstance(value, bool):
            raise ApiError(400, f"'{field}' = {json.dumps(v)} is not supported: {why}",
                           param=field, code="unsupported_value")
        return None
    return check


def _bool(field, v, _):
    if not isinstance(v, bool):
        raise _bad(field, "true or false", v)
    return v


def _str(field, v, _):
    if not isinstance(v, str):
        raise _bad(field, "a string", v)
    return v


def _stop(field, v, limits):
    stops = [v] if isinstance(v, str) else v
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise _bad(field, "a non-empty string or a list of them", v)
    if len(stops) > limits.max_stop:
        raise ApiError(400, f"'{field}' has {len(stops)} strings; this server takes at most "
                       f"{limits.max_stop} (serve.max_stop)", param=field)
    long = [s for s in stops if len(s) > limits.max_stop_chars]
    if long:
        raise ApiError(400, f"'{field}' string {json.dumps(long[0][:20])}... is longer than "
                       f"{limits.max_stop_chars} characters (serve.max_stop_chars)", param=field)
    return tuple(stops)


def _token_ids(field, v, _):
    if not isinstance(v, list) or not all(_is_int(t) and t >= 0 for t in v):
        raise _bad(field, "a list of token ids (integers >= 0)", v)
    return tuple(v)


def _stream_options(field, v, _):
    if not isinstance(v, dict) or set(v) - {"include_usage"} or not isinstance(
            v.get("include_usage", False), bool):
        raise _bad(field, 'an object {"include_usage": true|false}', v)
    return bool(v.get("include_usage", False))


def _messages(field, v, _):
    if not isinstance(v, list) or not v:
        raise _bad(field, "a non-empty list of {role, content} messages", v)
    out = []
    for i, m in enumerate(v):
        where = f"{field}[{i}]"
        if not isinstance(m, dict) or set(m) - {"role", "content", "name"}:
            raise _bad(where, "an object with 'role' and 'content' (and optionally 'name')", m)
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise _bad(where + ".role", " | ".join(ROLES), role)
        if isinstance(content, list):  # content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text"
                       and isinstance(p.get("text"), str) for p in content):
                raise _bad(where + ".content", 'a string or a list of {"type": "text", '
                           '"text": ...} parts (this server reads text only)', content)
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise _bad(where + ".content", "a string", content)
        out.append({"role": "system" if role == "developer" else role, "content": content})
    return out


def _prompt(field, v, _):
    if isinstance(v, list) and len(v) == 1 and isinstance(v[0], (str, list)):
        v = v[0]  # a batch of one
    if isinstance(v, str):
        if not v:
            raise _bad(field, "a non-empty string", v)
        return v
    if isinstance(v, list) and v and all(_is_int(t) and t >= 0 for t in v):
        return list(v)
    raise _bad(field, "a string or a list of token ids (one prompt per request: send several "
               "requests for several prompts)", v)


_COMMON = {
    "model": _str, "max_tokens": _int(1), "temperature": _num(0, 2), "top_p": _num(0, 1, True),
    "top_k": _int(-1), "seed": _int(-2 ** 63, 2 ** 63 - 1), "stop": _stop,
    "stop_token_ids": _token_ids, "ignore_eos": _bool, "stream": _bool, "stream_options": _stream_options,
    "user": _str,
    "n": _only(1, "one choice per request; send the request n times instead"),
    "presence_penalty": _only(0, "fr_jax samples from the fused logits as they are"),
    "frequency_penalty": _only(0, "fr_jax samples from the fused logits as they are"),
}
FIELDS = {
    CHAT: dict(_COMMON, messages=_messages, max_completion_tokens=_int(1),
               logprobs=_only(False, "log-probabilities are not returned"),
               top_logprobs=_only(0, "log-probabilities are not returned"),
               parallel_tool_calls=_only(False, "tools are not supported")),
    COMPLETION: dict(_COMMON, prompt=_prompt,
                     echo=_only(False, "the prompt is not echoed"),
                     best_of=_only(1, "one candidate per request"),
                     logprobs=_only(0, "log-probabilities are not returned"),
                     suffix=_only("", "no suffix (insertion) completion")),
}
REQUIRED = {CHAT: ("model", "messages"), COMPLETION: ("model", "prompt")}


def parse_call(kind: str, raw: bytes, limits) -> Call:
    """The JSON body `raw` of a `kind` request -> Call; ApiError(400) naming the first bad
    field. `limits` has max_stop and max_stop_chars (the serve section)."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    table = FIELDS[kind]
    for field in body:
        if field not in table:
            raise ApiError(400, f"unknown field '{field}' (this endpoint takes: "
                           f"{', '.join(sorted(table))})", param=field,
                           code="unknown_parameter")
    for field in REQUIRED[kind]:
        if body.get(field) is None:
            raise ApiError(400, f"'{field}' is required", param=field)
    values: Dict[str, Any] = {}
    for field, v in body.items():
        if v is not None:
            values[field] = table[field](field, v, limits)
    if "stream_options" in values and not values.get("stream"):
        raise ApiError(400, "'stream_options' is only allowed with 'stream': true",
                       param="stream_options")
    top_k = values.get("top_k")
    return Call(kind=kind, model=values["model"],
                prompt=values["messages" if kind == CHAT else "prompt"],
                max_tokens=values.get("max_completion_tokens", values.get("max_tokens")),
                temperature=values.get("temperature"), top_p=values.get("top_p"),
                top_k=0 if top_k == -1 else top_k,  # -1 is "off" in vLLM's convention
                seed=values.get("seed"), stop=values.get("stop", ()),
                stop_token_ids=values.get("stop_token_ids", ()),
                ignore_eos=values.get("ignore_eos", False),
                stream=values.get("stream", False),
                include_usage=values.get("stream_options", False))


# ------------------------------------------------------------------------ response objects
def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def choice(kind: str, text: str, finish_reason: Optional[str], extension: dict,
           delta: bool = False, first: bool = False) -> dict:
    """One choice: a whole answer, or (delta) one streamed piece of it. `extension` is the
    fr_jax field (the experts behind the tokens)."""
    out: Dict[str, Any] = {"index": 0}
    if kind == COMPLETION:
        out["text"] = text
        out["logprobs"] = None
    elif delta:
        out["delta"] = ({"role": "assistant", "content": text} if first
                        else ({"content": text} if text else {}))
    else:
        out["message"] = {"role": "assistant", "content": text}
    out["finish_reason"] = finish_reason
    out["fr_jax"] = extension
    return out


def envelope(kind: str, rid: str, created: int, model: str, choices: Sequence[dict],
             stream: bool = False, usage_counts: Optional[dict] = None) -> dict:
    """The response object (`chat.completion`, `chat.completion.chunk`, `text_completion`)."""
    obj = kind + (".chunk" if stream and kind == CHAT else "")
    out = {"id": rid, "object": obj, "created": created, "model": model,
           "choices": list(choices)}
    if usage_counts is not None or not stream:
        out["usage"] = usage_counts
    return out


def sse(obj) -> bytes:
    """One server-sent event of a stream (`data: [DONE]` ends it)."""
    return b"data: " + (obj.encode() if isinstance(obj, str) else json.dumps(obj).encode()) \
        + b"\n\n"


def now() -> int:
    return int(time.time())
