"""The server's host-side pieces without a server: request bodies checked field by field
(fr_jax/serving/protocol.py), streamed text cut at stop strings and never taken back
(fr_jax/serving/detokenize.py), the room a prompt leaves for its answer."""

import json
import types

import pytest

from fr_jax.serving.detokenize import TextStream
from fr_jax.serving.protocol import CHAT, COMPLETION, ApiError, parse_call

LIMITS = types.SimpleNamespace(max_stop=2, max_stop_chars=5)
MSG = [{"role": "user", "content": "hi"}]


def _parse(kind, **body):
    return parse_call(kind, json.dumps(body).encode(), LIMITS)


def test_a_good_body_becomes_a_call():
    c = _parse(CHAT, model="m", messages=MSG + [{"role": "developer", "content": [
        {"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}], max_tokens=5,
        temperature=0.5, top_p=0.9, top_k=-1, seed=7, stop="x", stream=True,
        stream_options={"include_usage": True}, n=1, presence_penalty=0.0, logprobs=False)
    assert c.prompt == [{"role": "user", "content": "hi"}, {"role": "system", "content": "ab"}]
    assert (c.max_tokens, c.temperature, c.top_p, c.top_k, c.seed, c.stop) == (
        5, 0.5, 0.9, 0, 7, ("x",))
    assert c.stream and c.include_usage
    assert _parse(CHAT, model="m", messages=MSG, max_completion_tokens=3).max_tokens == 3
    assert _parse(COMPLETION, model="m", prompt=["abc"]).prompt == "abc"
    assert _parse(COMPLETION, model="m", prompt=[[1, 2]], echo=False).prompt == [1, 2]
    nulls = _parse(COMPLETION, model="m", prompt="a", max_tokens=None, suffix=None, seed=None)
    assert nulls.max_tokens is None and nulls.seed is None  # null = the default


@pytest.mark.parametrize("kind,body,param", [
    (CHAT, b"{", None), (CHAT, b"\xff\xfe", None), (CHAT, b'"text"', None),
    (CHAT, {"messages": MSG}, "model"),
    (CHAT, {"model": "m"}, "messages"),
    (CHAT, {"model": "m", "messages": "hi"}, "messages"),
    (CHAT, {"model": "m", "messages": [{"role": "user"}]}, "messages[0].content"),
    (CHAT, {"model": "m", "messages": [{"role": "user", "content": "a", "x": 1}]},
     "messages[0]"),
    (CHAT, {"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     "messages[0].content"),
    (CHAT, {"model": "m", "messages": MSG, "temperature": "hot"}, "temperature"),
    (CHAT, {"model": "m", "messages": MSG, "temperature": 2.5}, "temperature"),
    (CHAT, {"model": "m", "messages": MSG, "top_p": 0}, "top_p"),
    (CHAT, {"model": "m", "messages": MSG, "max_tokens": True}, "max_tokens"),
    (CHAT, {"model": "m", "messages": MSG, "max_tokens": 1.5}, "max_tokens"),
    (CHAT, {"model": "m", "messages": MSG, "top_k": -2}, "top_k"),
    (CHAT, {"model": "m", "messages": MSG, "stop": ["a", "b", "c"]}, "stop"),
    (CHAT, {"model": "m", "messages": MSG, "stop": ["abcdef"]}, "stop"),
    (CHAT, {"model": "m", "messages": MSG, "stop": [""]}, "stop"),
    (CHAT, {"model": "m", "messages": MSG, "stop_token_ids": [-1]}, "stop_token_ids"),
    (CHAT, {"model": "m", "messages": MSG, "n": 3}, "n"),
    (CHAT, {"model": "m", "messages": MSG, "logprobs": True}, "logprobs"),
    (CHAT, {"model": "m", "messages": MSG, "frequency_penalty": 0.5}, "frequency_penalty"),
    (CHAT, {"model": "m", "messages": MSG, "tools": []}, "tools"),
    (CHAT, {"model": "m", "messages": MSG, "stream_options": {"include_usage": True}},
     "stream_options"),
    (COMPLETION, {"model": "m", "prompt": ""}, "prompt"),
    (COMPLETION, {"model": "m", "prompt": ["a", "b"]}, "prompt"),
    (COMPLETION, {"model": "m", "prompt": [1, -2]}, "prompt"),
    (COMPLETION, {"model": "m", "prompt": "a", "echo": True}, "echo"),
    (COMPLETION, {"model": "m", "prompt": "a", "messages": MSG}, "messages"),
])
def test_a_bad_body_is_refused_naming_the_field(kind, body, param):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    with pytest.raises(ApiError) as e:
        parse_call(kind, raw, LIMITS)
    assert e.value.status == 400 and e.value.param == param
    err = e.value.body()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param
    assert param is None or f"'{param.split('[')[0]}" in err["message"]


def test_nan_and_infinity_are_not_numbers_here():
    for bad in (b'NaN', b'Infinity'):
        with pytest.raises(ApiError) as e:
            parse_call(CHAT, b'{"model": "m", "messages": [{"role": "user", "content": "a"}], '
                       b'"temperature": ' + bad + b'}', LIMITS)
        assert e.value.param == "temperature"


# ---------------------------------------------------------------- streamed text, stop strings
def _decode(ids):  # one character per id, id 0 an end token with no text, 9 half a character
    return "".join("\ufffd" if i == 9 else ("" if i == 0 else chr(ord("a") + i - 1)) for i in ids)


def _stream(stops, chunks):
    ts = TextStream(_decode, stops)
    shown, kept = [], []
    for c in chunks:
        text, keep = ts.feed(c)
        shown.append(text)
        kept.append(keep)
    return ts, shown, kept


def test_text_streams_whole_without_stop_strings():
    ts, shown, kept = _stream((), [[1, 2], [3], [0]])
    assert shown == ["ab", "c", ""] and kept == [2, 1, 1] and ts.flush() == ""


def test_a_stop_string_cuts_the_text_and_the_tokens_where_it_completes():
    ts, shown, kept = _stream(("cd",), [[1, 2, 3], [4, 5, 6]])
    assert "".join(shown) == "ab" and ts.text == "ab" and ts.stopped
    assert kept == [3, 1]  # the token that completed "cd" is the last one kept
    assert ts.feed([7]) == ("", 0)


def test_text_that_may_begin_a_stop_string_is_held_back_then_released():
    ts, shown, _ = _stream(("cx",), [[1, 2, 3], [4], [5]])
    assert shown == ["ab", "c", "d"] and not ts.stopped  # "c" waited for "d"
    ts2 = TextStream(_decode, ("cx",))
    assert ts2.feed([1, 2, 3]) == ("ab", 3) and ts2.flush() == "c"


def test_half_a_character_waits_for_its_other_half():
    ts, shown, _ = _stream((), [[1, 9], [2]])
    assert shown == ["a", "\ufffdb"]
