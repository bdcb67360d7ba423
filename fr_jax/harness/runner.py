"""Run management: every (benchmark, mode) decoded, scored, cached and tabulated.

    generations/<benchmark>/<mode>.jsonl   one line per decoded example, appended batch by
                                           batch: text, token ids, the expert of each token
    scores/<benchmark>/<mode>.jsonl        one verdict per scored example
    results.{json,md,png}                  the table (benchmarks x modes, plus the average),
                                           the routing shares, the chart

Each cached line carries a key: a hash of what produced it (the lineup's fingerprint, the
mode, the rendered prompt, max-new-tokens, sampling; for a verdict, also the scorer and the
generated text). A rerun keeps the lines whose key still matches, so an interrupted run
resumes where it stopped and a changed prompt, budget or checkpoint is decoded anew rather
than read stale. Only whole batches are written, each flushed to disk at once: a kill loses
at most the batch in flight. Greedy decoding (the protocol) gives the same answers however
the examples are batched; with sampling, the examples re-batched on resume draw from other
RNG streams than a fresh run would.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import hashlib
import json
import os
from typing import Dict, List, Optional, Sequence

import numpy as np

from fr_jax.harness import scoring
from fr_jax.harness.benchmarks import Example, get_benchmark
from fr_jax.harness.generation import ModeRunner, cache_slots, encode, token_shares
from fr_jax.harness.sandbox import Limits
from fr_jax.inference.lineup import Lineup
from fr_jax.inference.sampling import Sampling
from fr_jax.inference.speculative import acceptance
from fr_jax.runtime import distributed

SCORER_VERSION = 1  # bump when a scorer's verdicts change, so cached ones are redone


@dataclasses.dataclass
class Settings:
    """How the harness runs. `workdir` None keeps nothing on disk (no resume)."""

    max_new_tokens: Dict[str, int]
    workdir: Optional[str] = None
    batch_size: int = 32
    chunk: int = 8
    chat: bool = True
    sampling: Sampling = Sampling()
    seed: int = 0
    limits: Limits = Limits()
    workers: int = 2  # sandboxed programs run at once
    progress: bool = True
    columns: str = "benchmarks"  # benchmarks | groups (one column per example group)


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def folder_fingerprint(paths: Sequence[str]) -> List:
    """What identifies checkpoint folders cheaply (file names, sizes, modification times),
    so cached generations are redone when a checkpoint changes."""
    out = []
    for p in paths:
        for dirpath, _, files in sorted(os.walk(p)):
            for fn in sorted(files):
                st = os.stat(os.path.join(dirpath, fn))
                out.append([os.path.relpath(os.path.join(dirpath, fn), p), st.st_size,
                            int(st.st_mtime)])
    return out


def _folders(x) -> List[str]:
    """Every existing folder named anywhere in a Lineup's `source` (str / list / dict)."""
    if isinstance(x, str):
        return [x] if os.path.isdir(x) else []
    if isinstance(x, dict):
        x = list(x.values())
    return [p for v in (x or []) for p in _folders(v)]


def lineup_fingerprint(lineup: Lineup) -> str:
    return _key(lineup.source, folder_fingerprint(_folders(lineup.source)),
                sorted(lineup.models), list(lineup.expert_names))


def safe_name(mode: str) -> str:
    return mode.replace(":", "_").replace("/", "_")


class JsonlCache:
    """Records by example id in an append-only JSONL file; a line cut short by a kill is
    ignored."""

    def __init__(self, path: Optional[str]):
        self.path = path
        self.records: Dict[str, dict] = {}
        if not (path and os.path.isfile(path)):
            return
        with open(path, "rb+" if distributed.is_main() else "rb") as f:
            data = f.read()
            whole = data.rfind(b"\n") + 1
            if whole < len(data) and distributed.is_main():
                f.truncate(whole)  # a line cut short: the next append would be glued to it
        for line in data[:whole].splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            self.records[rec["id"]] = rec

    def get(self, example_id: str, key: str) -> Optional[dict]:
        rec = self.records.get(example_id)
        return rec if rec is not None and rec.get("key") == key else None

    def add(self, recs: Sequence[dict]):
        for r in recs:
            self.records[r["id"]] = r
        if not self.path or not distributed.is_main():  # one writer per launch
            return
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        with open(self.path, "a") as f:
            f.write("".join(json.dumps(r) + "\n" for r in recs))
            f.flush()
            os.fsync(f.fileno())


def _bar(total: int, initial: int, desc: str, on: bool):
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=initial, desc=desc,
                disable=not on or not distributed.is_main(), dynamic_ncols=True, unit="ex")


def _path(s: Settings, kind: str, bench: str, mode: str) -> Optional[str]:
    return os.path.join(s.workdir, kind, bench, safe_name(mode) + ".jsonl") if s.workdir else None


def cached_generations(lineup: Lineup, bench: str, mode: str, examples: Sequence[Example],
                       s: Settings, fingerprint: str,
                       runners: Optional[Dict[tuple, ModeRunner]] = None) -> List[dict]:
    """Each example's generation record, decoding only those not cached under their key.
    `runners` (shapes and sampling -> ModeRunner), when given, keeps the compiled runners
    for later calls: several draws of one mode at one sampling compile once."""
    cache = JsonlCache(_path(s, "generations", bench, mode))
    max_new = s.max_new_tokens[bench]
    # Speculation keeps greedy tokens but not sampled draws, and its records carry their
    # acceptance: part of the key when on (the keys of plain decoding stay as they were).
    spec = (lineup.speculate,) if lineup.speculate else ()
    keys = [_key(fingerprint, mode, e.prompt, max_new, s.chat, dataclasses.asdict(s.sampling),
                 s.seed, *spec) for e in examples]
    todo = [i for i, (e, k) in enumerate(zip(examples, keys)) if cache.get(e.id, k) is None]
    if s.progress and distributed.is_main():
        print(f"[eval] {bench} {mode}: {len(examples) - len(todo)} cached, {len(todo)} to "
              "decode", flush=True)
    if todo:
        # Batch size, prompt width and cache length come from the whole benchmark, cached
        # examples included: one compiled prefill and decode step per (benchmark, mode),
        # and a resumed run decodes in the same shapes as a fresh one.
        ids = encode(lineup, [e.prompt for e in examples], s.chat)
        batch = min(s.batch_size, len(examples))
        shape = (mode, max_new, batch, cache_slots(ids, max_new, s.chunk, lineup.speculate),
                 s.sampling, s.chunk, max(len(x) for x in ids))
        runner = (runners or {}).get(shape) or ModeRunner(lineup, *shape[:-1], width=shape[-1])
        if runners is not None:
            runners[shape] = runner
        bar = _bar(len(examples), len(examples) - len(todo), f"{bench} {mode}", s.progress)
        for lo in range(0, len(todo), batch):
            part = todo[lo:lo + batch]
            texts, tokens, chosen, seconds, drafts = runner.run([ids[i] for i in part],
                                                                seed=s.seed + part[0])
            cache.add([{"id": examples[i].id, "key": keys[i], "text": t, "tokens": k,
                        "experts": c, "seconds": seconds / len(part),
                        **({"speculation": drafts[j]} if drafts else {})}
                       for j, (i, t, k, c) in enumerate(zip(part, texts, tokens, chosen))])
            bar.update(len(part))
        bar.close()
    return [cache.get(e.id, k) for e, k in zip(examples, keys)]


def score(bench: str, mode: str, examples: Sequence[Example], gens: Sequence[dict],
          s: Settings) -> List[dict]:
    """Each example's verdict, scoring only those not cached; sandboxed programs run
    `s.workers` at a time."""
    name = get_benchmark(bench).scorer
    fn = scoring.BENCHMARK_SCORERS[name]
    if name in scoring.EXECUTES_CODE:
        limits = s.limits
        fn = lambda ref, out, _f=fn: _f(ref, out, limits)  # noqa: E731
    cache = JsonlCache(_path(s, "scores", bench, mode))
    keys = [_key(SCORER_VERSION, name, g["key"], g["text"]) for g in gens]
    todo = [i for i, (e, k) in enumerate(zip(examples, keys)) if cache.get(e.id, k) is None]

    def record(i, v: scoring.Verdict) -> dict:
        return {"id": examples[i].id, "key": keys[i], "correct": v.correct, "details": v.details}

    if todo:
        bar = _bar(len(examples), len(examples) - len(todo), f"score {bench} {mode}",
                   s.progress and name in scoring.EXECUTES_CODE)
        if name in scoring.EXECUTES_CODE:  # one process each: run several at once
            with cf.ThreadPoolExecutor(max(1, s.workers)) as pool:
                futures = {pool.submit(fn, examples[i].reference, gens[i]["text"]): i
                           for i in todo}
                for fut in cf.as_completed(futures):
                    cache.add([record(futures[fut], fut.result())])
                    bar.update(1)
        else:  # math-verify times itself out with SIGALRM: main thread only
            for i in todo:
                cache.add([record(i, fn(examples[i].reference, gens[i]["text"]))])
                bar.update(1)
        bar.close()
    return [cache.get(e.id, k) for e, k in zip(examples, keys)]


def _column(bench: str, e: Example, s: Settings, single: bool) -> str:
    if s.columns == "groups":
        return e.group if single else (f"{bench}/{e.group}" if e.group else bench)
    return bench


def _mean(flags: List[Optional[bool]]) -> Optional[float]:
    scored = [f for f in flags if f is not None]
    return float(np.mean(scored)) if scored else None


def evaluate(lineup: Lineup, examples: Dict[str, Sequence[Example]], modes: Sequence[str],
             s: Settings, fingerprint: str = "") -> dict:
    """Every mode on every benchmark's examples -> the results dict (see report.py): accuracy
    per (mode, column) over the scored examples, the average over columns, routing shares,
    IFEval's extra metrics, skipped examples with their reasons, and the per-prompt oracle
    over the experts when every `expert:i` mode ran."""
    fingerprint = fingerprint or lineup_fingerprint(lineup)
    names = list(lineup.expert_names)
    n_exp = len(names)
    single = len(examples) == 1
    columns: List[str] = []
    col_of: Dict[str, List[str]] = {}
    for bench, exs in examples.items():
        col_of[bench] = [_column(bench, e, s, single) for e in exs]
        columns += [c for c in dict.fromkeys(col_of[bench]) if c not in columns]
    res = {"benchmarks": list(examples), "domains": columns, "modes": list(modes),
           "expert_names": names, "n": {c: 0 for c in columns}, "accuracy": {}, "average": {},
           "shares": {}, "scored": {}, "skipped": {}, "metrics": {}, "seconds": {},
           "examples": {}, "titles": {b: get_benchmark(b).title for b in examples}}
    for bench in examples:
        for c in col_of[bench]:
            res["n"][c] += 1
    correct: Dict[str, Dict[str, List[Optional[bool]]]] = {}
    for mode in modes:
        flags = {c: [] for c in columns}
        chosen = {c: [] for c in columns}
        drafts = {c: [] for c in columns}  # [expert passes, drafts kept] per example
        res["skipped"][mode], res["metrics"][mode], res["examples"][mode] = {}, {}, {}
        seconds = 0.0
        correct[mode] = {}
        for bench, exs in examples.items():
            gens = cached_generations(lineup, bench, mode, exs, s, fingerprint)
            verdicts = score(bench, mode, exs, gens, s)
            seconds += sum(g["seconds"] for g in gens)
            correct[mode][bench] = [v["correct"] for v in verdicts]
            for c, g, v in zip(col_of[bench], gens, verdicts):
                flags[c].append(v["correct"])
                chosen[c].append(g["experts"])
                if "speculation" in g:
                    drafts[c].append(g["speculation"])
            reasons = {sk["what"]: sk["reason"] for v in verdicts
                       for sk in v["details"].get("skipped", [])}
            if reasons:
                res["skipped"][mode][bench] = {
                    "count": sum(v["correct"] is None for v in verdicts), "reasons": reasons}
            if get_benchmark(bench).scorer == "ifeval":
                res["metrics"][mode][bench] = ifeval_metrics(verdicts)
            res["examples"][mode][bench] = [
                {"id": e.id, "prompt": e.prompt, "output": g["text"], "correct": v["correct"],
                 "experts": g["experts"]} for e, g, v in list(zip(exs, gens, verdicts))[:3]]
        res["accuracy"][mode] = {c: _mean(flags[c]) for c in columns}
        res["scored"][mode] = {c: sum(f is not None for f in flags[c]) for c in columns}
        vals = [v for v in res["accuracy"][mode].values() if v is not None]
        res["average"][mode] = float(np.mean(vals)) if vals else None
        res["seconds"][mode] = round(seconds, 2)
        if any(drafts.values()):  # per column: tokens per expert pass, drafts kept
            res.setdefault("speculation", {})[mode] = {
                c: acceptance(*np.asarray(drafts[c]).reshape(-1, 2).T, lineup.speculate)
                for c in columns if drafts[c]}
        if mode not in lineup.models:
            res["shares"][mode] = {c: dict(zip(names + ["router"],
                                               token_shares(chosen[c], n_exp).round(4).tolist()))
                                   for c in columns}
    solo = [f"expert:{i}" for i in range(n_exp)]
    if n_exp and all(m in correct for m in solo):
        _oracle(res, correct, solo, col_of, columns)
    return res


def _oracle(res: dict, correct, solo: List[str], col_of, columns: List[str]):
    """The per-prompt best expert: an example counts if any expert alone gets it right
    (unscored where an expert's verdict is missing)."""
    flags = {c: [] for c in columns}
    for bench, cols in col_of.items():
        per = np.array([[np.nan if v is None else float(v) for v in correct[m][bench]]
                        for m in solo])
        for j, c in enumerate(cols):
            col = per[:, j]
            flags[c].append(None if np.isnan(col).any() else bool(col.max() > 0))
    res["accuracy"]["oracle"] = {c: _mean(flags[c]) for c in columns}
    vals = [v for v in res["accuracy"]["oracle"].values() if v is not None]
    res["average"]["oracle"] = float(np.mean(vals)) if vals else None
    res["modes"].append("oracle")


def ifeval_metrics(verdicts: Sequence[dict]) -> dict:
    """IFEval's four numbers over the scored prompts: prompt-level strict / loose and
    instruction-level strict / loose, plus how many prompts were left unscored."""
    scored = [v for v in verdicts if v["correct"] is not None]
    inst = [r for v in scored for r in v["details"]["instructions"]]
    frac = lambda xs: float(np.mean(xs)) if xs else None  # noqa: E731
    return {"prompt_strict": frac([v["correct"] for v in scored]),
            "prompt_loose": frac([v["details"]["loose"] for v in scored]),
            "instruction_strict": frac([r["strict"] for r in inst]),
            "instruction_loose": frac([r["loose"] for r in inst]),
            "prompts_scored": len(scored), "prompts_unscored": len(verdicts) - len(scored)}
