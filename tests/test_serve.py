"""`python -m fr_jax.serve` on the bundled world, driven by the official `openai` client and
raw HTTP: greedy answers equal `python -m fr_jax.decode`'s tokens and experts, streamed and
not, with 72 concurrent requests through 4 slots (continuous batching changes no token);
every bad request is an OpenAI error object naming the field, a fuzz of random bodies leaves
the engine answering; a speculative server (decode.speculate) gives the same greedy
answers; a client that leaves frees its slot; a full queue is a 429; SIGTERM
drains the requests in flight and exits 0."""

import asyncio
import json
import random
import subprocess
import sys
import threading
import time

import openai
import pytest

from cli_env import REPO, one_device_env
from serve_client import Server

pytestmark = pytest.mark.slow

KEY = "sk-fr-jax-test"
ARGS = ("--slots=4", "--config.serve.cache_len=128", "--config.serve.buckets=(16, 48)",
        "--config.serve.max_queue=128", "--config.serve.max_tokens=80")
MODEL = "fusionroute"
WORDS = ["kqzt", "mild", "plum", "zebra", "oxide", "quart", "vivid", "fjord"]


def _prompts(n):
    """n prompts of the bundled world's tasks, 8 to ~40 characters."""
    rng = random.Random(0)
    out = []
    for i in range(n):
        w = rng.choice(WORDS) + rng.choice(WORDS)[: i % 5]
        out.append([f"add {rng.randint(0, 99)}+{rng.randint(0, 99)}", f"rev {w}",
                    f"please caps {w}", f"twice rev {w}", f"wrap rot {w}",
                    f"please caps {w} {' '.join(rng.choice(WORDS) for _ in range(3))}"][i % 6])
    return out


CHAT_PROMPTS = _prompts(64)
TEXT_PROMPTS = _prompts(8)[::-1]
MAX_NEW = 24
EOS = 2  # the bundled world's end id


def _max_tokens(i):
    return 1 + (7 * i) % MAX_NEW


def _decode_cli(home, tmp, prompts, *extra):
    """The decode CLI's records for `prompts` (as a Popen to wait on, and the output path)."""
    pfile, out = tmp / f"p{len(extra)}.jsonl", tmp / f"o{len(extra)}.jsonl"
    pfile.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    proc = subprocess.Popen([sys.executable, "-m", "fr_jax.decode", f"--prompts_file={pfile}",
                             f"--output={out}", f"--config.decode.max_new_tokens={MAX_NEW}",
                             *extra], cwd=REPO, env=one_device_env(home),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return proc, out


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(server, {"chat": decode records, "text": decode records without the template})."""
    home, tmp = tmp_path_factory.mktemp("home"), tmp_path_factory.mktemp("ref")
    server = Server(home, *ARGS, env={"FR_JAX_API_KEY": KEY})
    refs = {"chat": _decode_cli(home, tmp, CHAT_PROMPTS),
            "text": _decode_cli(home, tmp, TEXT_PROMPTS, "--config.decode.chat=False")}
    try:
        server.wait_ready()
        records = {}
        for name, (proc, out) in refs.items():
            log = proc.communicate(timeout=600)[0]
            assert proc.returncode == 0, log[-3000:]
            records[name] = [json.loads(line) for line in out.read_text().splitlines()]
        yield server, records
    finally:
        server.stop()


def _client(server, **kw):
    return openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0,
                              timeout=300, **kw)


async def _chat(client, prompt, max_tokens, stream):
    """(text, token ids, experts, finish_reason, usage or None) of one chat request."""
    messages = [{"role": "user", "content": prompt}]
    if not stream:
        r = await client.chat.completions.create(model=MODEL, messages=messages,
                                                 max_tokens=max_tokens, temperature=0)
        c = r.choices[0]
        ext = c.model_extra["fr_jax"]
        return c.message.content, ext["token_ids"], ext["experts"], c.finish_reason, r.usage
    text, ids, experts, finish = "", [], [], None
    events = await client.chat.completions.create(model=MODEL, messages=messages,
                                                  max_tokens=max_tokens, temperature=0,
                                                  stream=True)
    async for chunk in events:
        c = chunk.choices[0]
        text += c.delta.content or ""
        ext = c.model_extra["fr_jax"]
        ids += ext["token_ids"]
        experts += ext["experts"]
        finish = c.finish_reason or finish
    return text, ids, experts, finish, None


async def _complete(client, prompt, max_tokens, stream):
    if not stream:
        r = await client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens,
                                            temperature=0)
        c = r.choices[0]
        ext = c.model_extra["fr_jax"]
        return c.text, ext["token_ids"], ext["experts"], c.finish_reason, r.usage
    text, ids, experts, finish = "", [], [], None
    async for chunk in await client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True):
        c = chunk.choices[0]
        text += c.text
        ids += c.model_extra["fr_jax"]["token_ids"]
        experts += c.model_extra["fr_jax"]["experts"]
        finish = c.finish_reason or finish
    return text, ids, experts, finish, None


def _check(answer, ref, max_tokens):
    text, ids, experts, finish, usage = answer
    want = ref["token_ids"][:max_tokens]
    assert (ids, experts) == (want, ref["experts"][:max_tokens]), ref["prompt"]
    if len(ref["token_ids"]) <= max_tokens:  # the whole answer: its end id or the budget
        assert text == ref["text"]
        assert finish == ("stop" if ref["token_ids"][-1] == EOS else "length")
    else:
        assert finish == "length" and len(ids) == max_tokens
    if usage is not None:
        assert usage.completion_tokens == len(ids) and usage.prompt_tokens > 0


def test_concurrent_requests_equal_the_decode_cli(served):
    """72 requests at once (64 chat, 8 completions; half streamed; answers cut at 1..24
    tokens) through 4 slots: each has the tokens and experts the decode CLI gives its prompt,
    and the CLI's text where the answer is whole."""
    server, refs = served

    async def go():
        client = _client(server)
        chats = [_chat(client, p, _max_tokens(i), i % 2 == 1)
                 for i, p in enumerate(CHAT_PROMPTS)]
        texts = [_complete(client, p, MAX_NEW, i % 2 == 0) for i, p in enumerate(TEXT_PROMPTS)]
        return await asyncio.gather(*chats, *texts)

    answers = asyncio.run(go())
    finishes = [a[3] for a in answers]
    assert finishes.count("length") > 10 and finishes.count("stop") > 10  # cut and whole
    for i, ref in enumerate(refs["chat"]):
        _check(answers[i], ref, _max_tokens(i))
    for i, ref in enumerate(refs["text"]):
        _check(answers[len(CHAT_PROMPTS) + i], ref, MAX_NEW)
    assert refs["chat"][0]["expert_names"] == ["math", "code", "instr"]
    assert server.metric('fr_jax_active_slots') == 0


def test_models_health_metrics_and_stop_strings(served):
    server, refs = served
    status, _, body = server.request("GET", "/health")
    assert status == 200 and json.loads(body) == {"status": "ok"}
    status, _, body = server.request("GET", "/v1/models",
                                     headers={"Authorization": f"Bearer {KEY}"})
    model = json.loads(body)["data"][0]
    assert status == 200 and model["id"] == MODEL and model["max_model_len"] == 128
    # a stop string cuts the text before it and ends the request
    ref = next(r for r in refs["chat"] if len(r["text"]) >= 3)
    stop = ref["text"][1:3]

    async def go():
        client = _client(server)
        r = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": ref["prompt"]}], stop=[stop],
            max_tokens=MAX_NEW)
        streamed = ""
        async for chunk in await client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": ref["prompt"]}],
                stop=stop, max_tokens=MAX_NEW, stream=True):
            streamed += chunk.choices[0].delta.content or ""
        return r, streamed

    r, streamed = asyncio.run(go())
    cut = ref["text"][:ref["text"].index(stop)]
    assert r.choices[0].message.content == cut == streamed
    assert r.choices[0].finish_reason == "stop"
    metrics = server.request("GET", "/metrics")[2].decode()
    for name in ("fr_jax_queue_depth", "fr_jax_active_slots", "fr_jax_prompt_tokens_total",
                 "fr_jax_generated_tokens_total", 'fr_jax_expert_tokens_total{expert="',
                 "fr_jax_time_to_first_token_seconds_bucket",
                 "fr_jax_inter_token_latency_seconds_bucket"):
        assert name in metrics, name
    assert server.metric("fr_jax_generated_tokens_total") > 0


def _error(server, path, body, key=KEY, headers=None):
    status, hdrs, raw = server.request(
        "POST", path, body, headers=dict({"Authorization": f"Bearer {key}"} if key else {},
                                         **(headers or {})))
    err = json.loads(raw)["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return status, err


BAD = [  # (path, body, status, the field the error names)
    ("/v1/chat/completions", b"{not json", 400, None),
    ("/v1/chat/completions", b"[1, 2]", 400, None),
    ("/v1/chat/completions", {"model": MODEL}, 400, "messages"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [], "x": 1}, 400, "x"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "robot", "content": "a"}]},
     400, "messages[0].role"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "a"}],
                              "temperature": 3}, 400, "temperature"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "a"}],
                              "n": 2}, 400, "n"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "a"}],
                              "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "a"}],
                              "max_tokens": 81}, 400, "max_tokens"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "a"}],
                              "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "a"}],
                              "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ("/v1/completions", {"model": MODEL, "prompt": "rev " + "ab" * 40}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": "rev ab", "max_tokens": 40,
                         "logprobs": 2}, 400, "logprobs"),
    ("/v1/completions", {"model": MODEL, "prompt": [5, 999]}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": ["a", "b"]}, 400, "prompt"),
    ("/v1/completions", {"model": "gpt-4", "prompt": "a"}, 404, "model"),
]


def test_bad_requests_get_an_openai_error_naming_the_field(served):
    server, _ = served
    for path, body, status, param in BAD:
        got, err = _error(server, path, body)
        assert (got, err["param"]) == (status, param), (body, err)
    got, err = _error(server, "/v1/completions", {"model": MODEL, "prompt": "a"}, key=None)
    assert got == 401 and err["code"] == "invalid_api_key"
    got, _ = _error(server, "/v1/completions", {"model": MODEL, "prompt": "a"}, key="sk-wrong")
    assert got == 401
    got, _ = _error(server, "/v1/completions", b"{" + b" " * (1 << 20) + b"}")
    assert got == 413
    assert _error(server, "/v1/nothing", {})[0] == 404

    async def go():  # the client surfaces the same object
        with pytest.raises(openai.BadRequestError) as e:
            await _client(server).chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "a"}], top_p=0)
        return e.value

    e = asyncio.run(go())
    assert e.status_code == 400 and e.param == "top_p"


def _random_value(rng, depth=0):
    kinds = [lambda: None, lambda: rng.choice([True, False]), lambda: rng.randint(-5, 10 ** 6),
             lambda: rng.choice([0.5, -1.0, 1e308, 2.0, 0.0]),
             lambda: "".join(rng.choice("ab{}\"\\ \u00e9\U0001f600") for _ in range(rng.randint(0, 9)))]
    if depth < 2:
        kinds += [lambda: [_random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))],
                  lambda: {rng.choice(["role", "content", "x", "type", "text"]):
                           _random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))}]
    return rng.choice(kinds)()


FIELDS = ["model", "messages", "prompt", "max_tokens", "temperature", "top_p", "top_k", "seed",
          "stop", "stream", "n", "stream_options", "logprobs", "echo", "tools", "ignore_eos",
          "stop_token_ids", "max_completion_tokens", "user"]


def test_fuzzed_bodies_never_stop_the_engine(served):
    """300 random bodies (random bytes, random JSON, valid requests with one field garbled):
    none is answered with a 5xx or kills the server; a normal request afterwards still
    gets the decode CLI's answer."""
    server, refs = served
    rng = random.Random(1)
    statuses = []
    for i in range(300):
        path = rng.choice(["/v1/chat/completions", "/v1/completions"])
        if i % 3 == 0:
            body = bytes(rng.randrange(256) for _ in range(rng.randint(0, 40)))
        elif i % 3 == 1:
            body = {f: _random_value(rng) for f in rng.sample(FIELDS, rng.randint(0, 6))}
        else:
            body = {"model": MODEL, "max_tokens": 2,
                    **({"messages": [{"role": "user", "content": "add 1+2"}]}
                       if "chat" in path else {"prompt": "add 1+2"})}
            body[rng.choice(FIELDS)] = _random_value(rng)
        status, _, raw = server.request("POST", path, body,
                                        headers={"Authorization": f"Bearer {KEY}"})
        statuses.append(status)
        assert status < 500, (body, raw[:500])
        if status != 200 and not raw.startswith(b"data:"):
            assert "error" in json.loads(raw), raw[:300]
    assert statuses.count(200) > 0 and statuses.count(400) > 100
    ref = refs["chat"][0]
    answer = asyncio.run(_chat(_client(server), ref["prompt"], MAX_NEW, False))
    _check(answer, ref, MAX_NEW)


def test_a_speculative_server_gives_the_decode_clis_answers(served, tmp_path):
    """--config.decode.speculate=3: 12 greedy chats at once through 3 slots (half streamed)
    have the tokens and experts plain decoding gives them; the metrics count each answer's
    tokens after the first as expert passes and the drafts they kept."""
    _, refs = served
    server = Server(tmp_path, "--slots=3", "--config.serve.cache_len=96",
                    "--config.serve.buckets=(48,)", "--config.decode.speculate=3",
                    env={"FR_JAX_API_KEY": KEY}).wait_ready()
    try:
        assert any("a chunk of 8 speculative (k=3) steps" in line for line in server.lines)

        async def go():
            client = _client(server)
            return await asyncio.gather(*[_chat(client, refs["chat"][i]["prompt"],
                                                _max_tokens(i), i % 2 == 0) for i in range(12)])
        answers = asyncio.run(go())
        for i, answer in enumerate(answers):
            _check(answer, refs["chat"][i], _max_tokens(i))
        passes = server.metric("fr_jax_speculative_passes_total")
        kept = server.metric("fr_jax_speculative_drafts_kept_total")
        assert kept > 0 and passes + kept == sum(len(a[1]) - 1 for a in answers)
    finally:
        server.stop()


def test_a_client_that_leaves_frees_its_slot(served):
    server, _ = served
    import http.client

    before = server.metric("fr_jax_generated_tokens_total")
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request("POST", "/v1/completions", json.dumps(
        {"model": MODEL, "prompt": "rev kqzt", "max_tokens": 80, "ignore_eos": True,
         "stream": True}).encode(), headers={"Authorization": f"Bearer {KEY}"})
    resp = conn.getresponse()
    assert resp.status == 200 and resp.readline().startswith(b"data: ")
    conn.sock.close()  # gone mid-stream
    conn.close()
    end = time.time() + 30
    while time.time() < end and (server.metric("fr_jax_active_slots") or
                                 'finish_reason="cancelled"' not in
                                 server.request("GET", "/metrics")[2].decode()):
        time.sleep(0.2)
    assert server.metric("fr_jax_active_slots") == 0
    # (80 tokens are ten chunks: the server hears of the leaving long before the last)
    assert server.metric("fr_jax_generated_tokens_total") - before < 80


N_LONG = 232  # with its 16 prompt slots, nearly the bundled world's 256 positions


def test_a_full_queue_is_429_and_sigterm_drains(tmp_path):
    """One slot, one waiting place: a third request is refused with Retry-After; SIGTERM
    while two run stops admission, both finish whole, the server exits 0."""
    server = Server(tmp_path, "--slots=1", "--config.serve.max_queue=1",
                    "--config.serve.cache_len=256", "--config.serve.buckets=(16,)",
                    "--config.serve.drain_s=120").wait_ready()
    # long answers (the cache's room), so the first still runs when the second queues
    body = {"model": MODEL, "prompt": "rev kqzt", "max_tokens": N_LONG, "ignore_eos": True}
    results = []

    def call():
        results.append(server.request("POST", "/v1/completions", body))

    def wait_for(gauge):
        end = time.time() + 30
        while time.time() < end and server.metric(gauge) < 1:
            time.sleep(0.02)

    try:
        threads = [threading.Thread(target=call) for _ in range(2)]
        threads[0].start()
        wait_for("fr_jax_active_slots")
        threads[1].start()
        wait_for("fr_jax_queue_depth")
        status, headers, raw = server.request("POST", "/v1/completions", body)
        assert status == 429 and int(headers["retry-after"]) >= 1, raw
        assert json.loads(raw)["error"]["type"] == "rate_limit_error"
        running = 2 - len(results)
        code = server.stop()
        for t in threads:
            t.join(60)
    finally:
        server.stop()
    assert code == 0, "".join(server.lines)[-3000:]
    assert [r[0] for r in results] == [200, 200]
    for _, _, raw in results:
        choice = json.loads(raw)["choices"][0]
        assert choice["finish_reason"] == "length" and len(
            choice["fr_jax"]["token_ids"]) == N_LONG
    print(f"requests running at SIGTERM: {running}")


def _doc_blocks(lang):
    import re

    text = open(f"{REPO}/docs/serving.md").read()
    return re.findall(r"^```" + lang + r"\n(.*?)^```$", text, re.S | re.M)


def _curl(server, words):
    """One documented curl line sent with http.client (the CI machine need not have curl):
    -H headers, -d body, the URL's path; -s / -N change nothing here."""
    headers, body, path = {}, None, None
    it = iter(words[1:])
    for w in it:
        if w == "-H":
            name, _, value = next(it).partition(":")
            headers[name.strip()] = value.strip().replace("$FR_JAX_API_KEY", KEY)
        elif w == "-d":
            body = next(it).encode()
        elif w.startswith("http://127.0.0.1:8000/"):
            path = w[len("http://127.0.0.1:8000"):]
        else:
            assert w in ("-s", "-sN", "-N"), w
    return server.request("POST" if body else "GET", path, body, headers)


def test_the_documented_examples_run(tmp_path):
    """docs/serving.md: `python -m fr_jax.serve` with no arguments (here on a free port)
    starts on the bundled world; its curl lines and its openai-client block get answers."""
    import shlex

    start = [shlex.split(line) for line in _doc_blocks("bash")[0].splitlines()]
    assert start == [["python", "-m", "fr_jax.serve"]]
    server = Server(tmp_path, env={"FR_JAX_API_KEY": KEY}).wait_ready()
    try:
        assert "8 slots x 256 cache slots; 7 programs" in "".join(server.lines)
        curls = [shlex.split(line) for line in _doc_blocks("bash")[1].splitlines()]
        assert [w[0] for w in curls] == ["curl", "curl"]
        status, _, raw = _curl(server, curls[0])
        reply = json.loads(raw)
        assert status == 200 and reply["choices"][0]["message"]["content"] == "45"
        assert reply["choices"][0]["fr_jax"]["expert_names"] == ["math", "code", "instr"]
        status, _, raw = _curl(server, curls[1])
        events = [e for e in raw.decode().split("\n\n") if e]
        assert status == 200 and events[-1] == "data: [DONE]" and len(events) >= 3
        code = _doc_blocks("python")[0].replace("127.0.0.1:8000", f"127.0.0.1:{server.port}")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             timeout=120, env=dict(one_device_env(tmp_path),
                                                   FR_JAX_API_KEY=KEY))
        assert out.returncode == 0, out.stderr[-3000:]
        first, second = out.stdout.splitlines()[:2]
        assert first.startswith("45 [0, 0, 0] ['math', 'code', 'instr']") and second == "tzqk"
    finally:
        assert server.stop() == 0


def test_the_serving_benchmark_runs_end_to_end(tmp_path):
    """benchmarks/serve_bench.py at a toy size: the real server over HTTP and static batching
    of the same requests; every request gets all the tokens it asked for (the benchmark
    asserts it), and the table and JSON have both servers' rows and the ratio."""
    out = tmp_path / "bench.json"
    run = subprocess.run([sys.executable, "benchmarks/serve_bench.py", "--requests=6",
                          "--slots=2", "--cache_len=128", "--rates=inf", "--seeds=0",
                          f"--out={out}"], cwd=REPO, env=one_device_env(tmp_path),
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    result = json.loads(out.read_text())
    assert [(r["server"], r["rate"]) for r in result["summary"]] == [
        ("continuous", "inf"), ("static", "inf")]
    assert all(r["tokens"] == result["rows"][0]["tokens"] > 0 for r in result["rows"])
    assert "| continuous | inf |" in run.stdout and "x (" in run.stdout
