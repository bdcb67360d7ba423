"""Serving: continuous batching (`python -m fr_jax.serve`) against static batching of the
same requests, side by side in one run.

    python benchmarks/serve_bench.py                          # the bundled world, this CPU
    python benchmarks/serve_bench.py --slots=16 --requests=400 --rates=4,inf

The workload is open-loop: requests arrive as a Poisson process (one run per rate; `inf` =
all at once), each a prompt of the bundled world's domains (fr_jax.harness.toy_world) with
an answer length drawn by domain (math short, code medium, instructions long: mixed
lengths), decoded greedily to exactly that length (`ignore_eos`), so both servers do the
same work.

- continuous: the real server in a subprocess, each request streamed over HTTP from its own
  thread; TTFT is the first streamed token's arrival, inter-token latency the gaps between
  streamed chunks spread over their tokens, occupancy the server's `fr_jax_active_slots`
  sampled every 100 ms while any slot is busy.
- static: the decode CLI's batching, in this process on the same lineup and decoder: when
  the decoder is free, up to `slots` waiting requests form a batch, padded to the slots and
  the largest prompt bucket, decoded until its longest answer is done; TTFT is the batch's
  prefill end, inter-token latency its decode time per step, occupancy the share of
  slot-steps that produce a wanted token.

Prints a table (tokens/s, TTFT and inter-token latency p50/p99, occupancy) with the ratio of
the two throughputs at each rate, the decode chunk's and the prefill's own times (the TTFT
target: under one chunk plus one prefill at moderate load), and writes JSON (--out).
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import runpy
import subprocess
import sys
import threading
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fr_jax import cli  # noqa: E402
from fr_jax.config import default_config_file  # noqa: E402
from fr_jax.corpus import encode_prompt  # noqa: E402
from fr_jax.harness.toy_world import make_tasks  # noqa: E402
from fr_jax.inference.lineup import lineup_from_config  # noqa: E402
from fr_jax.serving.engine import default_buckets  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Answer lengths (tokens) by domain: [lo, hi] drawn uniformly.
LENGTHS = {"math": (4, 16), "code": (16, 64), "instr": (48, 200)}


def workload(n: int, seed: int):
    """n (domain, prompt, answer tokens), the domains in turn, in arrival order."""
    rng = np.random.default_rng(seed)
    tasks = {d: make_tasks(d, n, seed) for d in LENGTHS}
    out = []
    for i in range(n):
        d = list(LENGTHS)[int(rng.integers(len(LENGTHS)))]
        lo, hi = LENGTHS[d]
        out.append((d, tasks[d][i].prompt, int(rng.integers(lo, hi + 1))))
    return out


def arrivals(n: int, rate: float, seed: int) -> np.ndarray:
    if math.isinf(rate):
        return np.zeros(n)
    gaps = np.random.default_rng([seed, 1]).exponential(1 / rate, n)
    return np.cumsum(gaps) - gaps[0]


def pct(xs, q):
    return float(np.percentile(xs, q)) * 1e3 if len(xs) else float("nan")


# ------------------------------------------------------------------------- continuous
class Served:
    """`python -m fr_jax.serve` on a free port; `port` once ready."""

    def __init__(self, slots: int, cache_len: int):
        env = dict(os.environ, PYTHONPATH=REPO)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fr_jax.serve", "--port=0", f"--slots={slots}",
             f"--config.serve.cache_len={cache_len}", "--config.serve.max_queue=100000"],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in self.proc.stdout:
            if line.startswith("listening on "):
                self.port = int(line.split()[2].rsplit(":", 1)[1])
            if line.startswith("ready in "):
                print(line.strip())
                break
        else:
            raise SystemExit("the server did not start")
        threading.Thread(target=lambda: [None for _ in self.proc.stdout], daemon=True).start()

    def active_slots(self) -> float:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        conn.request("GET", "/metrics")
        for line in conn.getresponse().read().decode().splitlines():
            if line.startswith("fr_jax_active_slots "):
                return float(line.split()[1])
        return 0.0

    def stop(self):
        self.proc.terminate()
        self.proc.wait(60)


def one_streamed(port, prompt, n_tokens, start, t_arrive, out, i):
    time.sleep(max(0.0, start + t_arrive - time.perf_counter()))
    sent = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    conn.request("POST", "/v1/chat/completions", json.dumps({
        "model": "fusionroute", "messages": [{"role": "user", "content": prompt}],
        "max_tokens": n_tokens, "ignore_eos": True, "temperature": 0, "stream": True}),
        {"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        out[i] = f"the server refused a request: {resp.status} {resp.read()[:300]}"
        return
    stamps = []  # (time, tokens in the event)
    for line in resp:
        if line.startswith(b"data: {"):
            ev = json.loads(line[6:])
            if ev["choices"]:
                stamps.append((time.perf_counter(), len(ev["choices"][0]["fr_jax"]["token_ids"])))
    conn.close()
    out[i] = (sent, stamps)


def run_continuous(served: Served, work, times):
    out = [None] * len(work)
    occupancy, done = [], threading.Event()

    def sample():
        while not done.is_set():
            occupancy.append(served.active_slots())
            time.sleep(0.1)

    start = time.perf_counter()
    threads = [threading.Thread(target=one_streamed, args=(served.port, p, n, start, t, out, i))
               for i, ((_, p, n), t) in enumerate(zip(work, times))]
    sampler = threading.Thread(target=sample)
    sampler.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done.set()
    sampler.join()
    refused = [o for o in out if isinstance(o, str)]
    if refused:
        raise SystemExit(refused[0])
    end = max(s[-1][0] for _, s in out)
    ttft = [s[0][0] - sent for sent, s in out]
    itl = [(b[0] - a[0]) / b[1] for _, s in out for a, b in zip(s, s[1:]) for _ in range(b[1])]
    tokens = sum(n for _, s in out for _, n in s)
    assert tokens == sum(n for _, _, n in work), "a request got fewer tokens than it asked"
    busy = [o for o in occupancy if o > 0]
    return dict(tokens=tokens, seconds=end - start, ttft=ttft, itl=itl,
                occupancy=float(np.mean(busy)) if busy else 0.0)


# ------------------------------------------------------------------------- static
def run_static(decoder, params, lineup, ids, work, times, slots, cache_len, width):
    """The decode CLI's batching of the same arrivals: up to `slots` waiting requests at a
    time, each batch run to its longest answer."""
    start, i = time.perf_counter(), 0
    ttft, itl, useful, slot_steps, last = [], [], 0, 0, 0.0
    while i < len(work):
        now = time.perf_counter() - start
        if times[i] > now:
            time.sleep(times[i] - now)
            now = times[i]
        batch = [j for j in range(i, len(work)) if times[j] <= now][:slots]
        i = batch[-1] + 1
        budgets = [work[j][2] for j in batch]
        rows = [ids[j] for j in batch] + [ids[batch[0]]] * (slots - len(batch))
        t0 = time.perf_counter() - start
        res = decoder.generate(params, rows, max(budgets), [], lineup.pad_id, width=width,
                               cache_len=cache_len)
        last = time.perf_counter() - start
        steps = max(budgets)
        for j in batch:
            ttft.append(t0 + res.seconds_prefill - times[j])
            itl += [res.seconds_decode / max(steps - 1, 1)] * (work[j][2] - 1)
        useful += sum(budgets)
        slot_steps += slots * steps
    return dict(tokens=useful, seconds=last, ttft=ttft, itl=itl,
                occupancy=useful / slot_steps * slots)


def row(name, rate, r):
    return dict(server=name, rate=rate, tokens=r["tokens"], seconds=round(r["seconds"], 3),
                tok_s=round(r["tokens"] / r["seconds"], 1),
                ttft_p50_ms=round(pct(r["ttft"], 50), 1), ttft_p99_ms=round(pct(r["ttft"], 99), 1),
                itl_p50_ms=round(pct(r["itl"], 50), 2), itl_p99_ms=round(pct(r["itl"], 99), 2),
                occupancy=round(r["occupancy"], 2))


def summary(rows, rates):
    """Per (server, rate): each metric's mean over the seeds; the throughput ratio to static
    batching per seed (same seed, same arrivals), its mean, min and max."""
    out = []
    for name in ("continuous", "static"):
        for rate in rates:
            mine = [r for r in rows if r["server"] == name and r["rate"] == rate]
            ratios = [r["tok_s"] / next(s["tok_s"] for s in rows if s["server"] == "static"
                                        and s["rate"] == rate and s["seed"] == r["seed"])
                      for r in mine]
            avg = {k: round(float(np.mean([r[k] for r in mine])), 2)
                   for k in mine[0] if k not in ("server", "rate", "seed")}
            out.append(dict(server=name, rate=rate, seeds=len(mine), **avg,
                            vs_static=round(float(np.mean(ratios)), 2),
                            vs_static_min=round(min(ratios), 2),
                            vs_static_max=round(max(ratios), 2)))
    return out


def finite(rows):
    """The rows with rate inf written "inf" (JSON has no infinity)."""
    return [dict(r, rate="inf" if math.isinf(r["rate"]) else r["rate"]) for r in rows]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--slots", type=int, default=8)
    ap.add_argument("--requests", type=int, default=160)
    ap.add_argument("--rates", default="8,inf", help="requests per second, one run each")
    ap.add_argument("--cache_len", type=int, default=256)
    ap.add_argument("--seeds", default="0,1,2", help="one workload and arrival draw each")
    ap.add_argument("--out", default="docs/results/serve_bench.json")
    args = ap.parse_args(argv)
    rates = [float(r) for r in args.rates.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]

    config = runpy.run_path(default_config_file("tiny.py"))["get_config"]()
    cli.use_bundled_world(config)
    lineup = lineup_from_config(config, ["fusionroute"])
    decoder, params = lineup.decoder("fusionroute", chunk=config.decode.chunk)
    works = {s: workload(args.requests, s) for s in seeds}
    ids = {s: [encode_prompt(lineup.tokenizer, p, True) for _, p, _ in w]
           for s, w in works.items()}
    longest = max(len(x) for v in ids.values() for x in v)
    width = min(b for b in default_buckets(args.cache_len) if b >= longest)
    cap = args.cache_len - width - decoder.chunk  # what every prompt's bucket leaves
    works = {s: [(d, p, min(n, cap)) for d, p, n in w] for s, w in works.items()}
    first = ids[seeds[0]]
    # warm the static path's programs, then time one prefill and one chunk of the slots
    for rows_, n in ((first[:args.slots], 2), (first[:1], 2), (first[:1], 2)):
        one = decoder.generate(params, rows_, n, [], lineup.pad_id,
                               width=width if len(rows_) > 1 else 16, cache_len=args.cache_len)
    full = decoder.generate(params, first[:args.slots], 1 + 4 * decoder.chunk, [],
                            lineup.pad_id, width=width, cache_len=args.cache_len)
    chunk_ms, prefill_ms = full.seconds_decode / 4 * 1e3, one.seconds_prefill * 1e3

    rows = []
    served = Served(args.slots, args.cache_len)
    try:
        for seed in seeds:
            for rate in rates:
                rows.append(dict(row("continuous", rate, run_continuous(
                    served, works[seed], arrivals(args.requests, rate, seed))), seed=seed))
    finally:
        served.stop()
    for seed in seeds:
        for rate in rates:
            rows.append(dict(row("static", rate, run_static(
                decoder, params, lineup, ids[seed], works[seed],
                arrivals(args.requests, rate, seed), args.slots, args.cache_len, width)),
                seed=seed))
    table = summary(rows, rates)

    print(f"\n{args.requests} requests x seeds {seeds}, answers {LENGTHS} tokens, "
          f"{args.slots} slots, cache {args.cache_len}; one decode chunk ({decoder.chunk} "
          f"steps, {args.slots} rows) {chunk_ms:.1f} ms, one prefill (1 row, 16 tokens) "
          f"{prefill_ms:.1f} ms; means over the seeds\n")
    head = ("server", "rate", "tok_s", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms",
            "itl_p99_ms", "occupancy")
    print("| " + " | ".join(head) + " | vs static (min-max) |")
    print("|" + " --- |" * (len(head) + 1))
    for r in table:
        print("| " + " | ".join(str(r[h]) for h in head)
              + f" | {r['vs_static']:.2f}x ({r['vs_static_min']:.2f}-{r['vs_static_max']:.2f}) |")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"slots": args.slots, "requests": args.requests, "lengths": LENGTHS,
                   "cache_len": args.cache_len, "seeds": seeds,
                   "chunk_steps": decoder.chunk, "chunk_ms": round(chunk_ms, 2),
                   "prefill_ms": round(prefill_ms, 2),
                   "device": str(lineup.mesh.devices.flat[0]), "summary": finite(table),
                   "rows": finite(rows)}, f, indent=1)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
