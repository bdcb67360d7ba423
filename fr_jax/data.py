"""Training data: local records -> token ids -> fixed-shape, resumable batches.

Records (JSONL, Parquet, or a folder saved with `datasets.Dataset.save_to_disk`):
  SFT:        {"prompt": str, "response": str}  or  {"messages": [{"role", "content"}, ...]}
              (the last message must be the assistant's; the rest is the prompt)
  preference: {"prompt": str, "chosen": str, "rejected": str}
The prompt is wrapped in the tokenizer's chat template (unless `chat=False`); the response
is followed by the tokenizer's EOS id. Only response tokens (and the EOS) are trained.

Bad records (missing fields, empty response, longer than the sequence length) are counted
in a `DataReport` and skipped, never a crash mid-epoch.

`Batcher` shuffles deterministically by (seed, epoch), packs (SFT) or pads examples into
[batch, seq_len] arrays so the step compiles once, and has a position (epoch, index) that a
checkpoint saves: a restart continues from the same example, and within an epoch no
example is seen twice or skipped.
"""

from __future__ import annotations

import collections
import dataclasses
import gzip
import os
from typing import Dict, List, Optional, Sequence

import json

import numpy as np

from fr_jax.errors import DataError


# ---------------------------------------------------------------------------- records
class Records(list):
    """The records of one data file, in order (a list of dicts), with `where[i]` naming
    record i ("file:line" for JSON lines, "file[i]" otherwise) and `bad`, the (where,
    reason) of every entry that is not a JSON object at all (read with strict=False)."""

    def __init__(self, rows=(), where=(), bad=()):
        super().__init__(rows)
        self.where, self.bad = list(where), list(bad)


def _json_entries(path: str):
    """(where, object or None, reason) for every entry of a JSON-lines file or a JSON array,
    each read as the JSON it is: a string stays a string however it looks ("62", "[108]")."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8", errors="replace") as f:
        text = f.read()
    if text.lstrip().startswith("["):  # a .json file holding one array of records
        try:
            array = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not a valid JSON array ({e.msg}, line {e.lineno}); "
                            "write one JSON object per line (JSONL) instead") from None
        for i, rec in enumerate(array):
            yield f"{path}[{i}]", rec, None if isinstance(rec, dict) else "not_an_object"
        return
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            yield f"{path}:{n}", None, "bad_json"
            continue
        yield f"{path}:{n}", rec, None if isinstance(rec, dict) else "not_an_object"


def load_records(path: str, split: Optional[str] = None, strict: bool = True) -> Records:
    """The records of a local JSONL / JSON (optionally .gz) / Parquet file or a folder saved
    with `datasets`. JSON is read line by line as written (no type inference across the
    file); an entry that is not a JSON object is a DataError naming file:line, or with
    strict=False is kept in `Records.bad` for the caller to count."""
    if not path:
        raise DataError("no data path configured (set --config.data.train_path)")
    if os.path.isdir(path):
        import datasets

        try:
            ds = datasets.load_from_disk(path)
        except Exception as e:  # datasets raises several types for a non-dataset folder
            raise DataError(f"{path!r} is not a folder saved with Dataset.save_to_disk: {e}") \
                from None
        if isinstance(ds, datasets.DatasetDict):
            ds = ds[split or "train"]
        return Records(ds, (f"{path}[{i}]" for i in range(len(ds))))
    if not os.path.isfile(path):
        raise DataError(f"data file {path!r} not found (expected .jsonl, .json (optionally "
                        ".gz) or .parquet, or a folder saved with datasets)")
    if os.path.getsize(path) == 0:
        raise DataError(f"data file {path!r} is empty")
    if path.endswith((".jsonl", ".json", ".jsonl.gz", ".json.gz")):
        out = Records()
        for where, rec, reason in _json_entries(path):
            if reason is None:
                out.append(rec)
                out.where.append(where)
            elif strict:
                raise DataError(f"{where}: " + ("not valid JSON" if reason == "bad_json" else
                                                "not a JSON object") + " (one JSON object "
                                "per line expected)")
            else:
                out.bad.append((where, reason))
        if not out and not out.bad:
            raise DataError(f"data file {path!r} is empty (no records, only blank lines)")
        return out
    if not path.endswith(".parquet"):
        raise DataError(f"{path!r}: unknown data format; use .jsonl, .json or .parquet")
    import datasets

    try:
        ds = datasets.load_dataset("parquet", data_files=path, split="train")
    except Exception as e:
        raise DataError(f"cannot read {path!r} as parquet: {e}") from None
    return Records(ds, (f"{path}[{i}]" for i in range(len(ds))))


def jsonl_objects(path: str, what: str, expected: str):
    """(line number, JSON object) for every non-blank line of the JSONL file of `what`; a
    missing file, a line that is not JSON or not an object is a DataError naming the file
    (or file:line) and `expected`, the records it should hold."""
    if not os.path.isfile(path):
        raise DataError(f"{what} {path!r} not found (expected JSONL, {expected})")
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(rec, dict):
                raise DataError(f"{path}:{n}: expected a JSON object ({expected})")
            yield n, rec


def read_prompts(path: str) -> List[str]:
    """Prompts from a JSONL file with a string "prompt" field on every line."""
    prompts = []
    for n, rec in jsonl_objects(path, "prompts file", 'one {"prompt": "..."} object per line'):
        if not isinstance(rec.get("prompt"), str):
            raise DataError(f'{path}:{n}: expected an object with a string "prompt" field')
        prompts.append(rec["prompt"])
    if not prompts:
        raise DataError(f"prompts file {path!r} has no prompts")
    return prompts


def encode_prompt(tokenizer, prompt, chat: bool) -> List[int]:
    """Token ids of a prompt (a string, or a list of chat messages); with `chat`, rendered
    by the tokenizer's chat template followed by the assistant header."""
    if not chat:
        if not isinstance(prompt, str):
            prompt = "\n".join(m["content"] for m in prompt)
        return list(tokenizer(prompt)["input_ids"])
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("chat formatting is on but this tokenizer has no chat template; use an "
                        "instruct checkpoint's tokenizer or turn chat formatting off")
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                             tokenize=False)
    return list(tokenizer(rendered, add_special_tokens=False)["input_ids"])


def _response_ids(tokenizer, text: str) -> List[int]:
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return ids + ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])


@dataclasses.dataclass
class DataReport:
    """How many records were kept, and why (and where) the others were skipped."""

    kept: int = 0
    skipped: Dict[str, int] = dataclasses.field(default_factory=collections.Counter)
    where: Dict[str, List[str]] = dataclasses.field(
        default_factory=lambda: collections.defaultdict(list))

    def skip(self, reason: str, where: Optional[str] = None):
        self.skipped[reason] += 1
        if where:
            self.where[reason].append(where)

    def __str__(self):
        def one(k):
            shown = self.where.get(k, [])[:3]
            more = "" if len(self.where.get(k, [])) <= 3 else ", ..."
            return f"{k}: {self.skipped[k]}" + (f" at {', '.join(shown)}{more}" if shown else "")
        why = ", ".join(one(k) for k in sorted(self.skipped)) or "none"
        return f"{self.kept} examples kept; skipped {sum(self.skipped.values())} ({why})"

    def to_json(self) -> dict:
        return {"kept": self.kept, "skipped": dict(self.skipped),
                "where": {k: list(v) for k, v in self.where.items()}}


@dataclasses.dataclass
class SFTExample:
    ids: np.ndarray  # [n] prompt + response token ids
    response: np.ndarray  # [n] 1 where ids[j] is a response token (trained as a target)
    # Optional precomputed expert signals for the n-1 targets ids[1:] (see train.py):
    signal_logprob: Optional[np.ndarray] = None  # [n-1, experts] log p_i(target)
    signal_top1: Optional[np.ndarray] = None  # [n-1, experts] each expert's top-1 token


@dataclasses.dataclass
class PrefExample:
    prompt: np.ndarray
    chosen: np.ndarray  # response ids (EOS included)
    rejected: np.ndarray
    # Optional precomputed CDPO reference (see train.precompute_reference): the stage-1
    # router's sequence log-prob of (chosen, rejected) [2], and its routing logits over each
    # side's n-1 targets ([n_c - 1, experts], [n_r - 1, experts]).
    ref_logprob: Optional[np.ndarray] = None
    ref_route: Optional[tuple] = None


def _is_messages(x) -> bool:
    return isinstance(x, list) and bool(x) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in x)


def _prompt_and_response(rec):
    """(prompt, response, None) of an SFT record, or (None, None, the reason to skip it)."""
    if rec.get("messages") is not None:
        msgs = rec["messages"]
        if not _is_messages(msgs):
            return None, None, "bad_messages"  # not a list of {"role": str, "content": str}
        if msgs[-1]["role"] != "assistant":
            return None, None, "last_message_not_assistant"
        if len(msgs) == 1:
            return None, None, "missing_prompt"
        return msgs[:-1], msgs[-1]["content"], None
    if rec.get("prompt") is None:
        return None, None, "missing_prompt"
    if not isinstance(rec["prompt"], str) and not _is_messages(rec["prompt"]):
        return None, None, "prompt_not_text"
    resp = rec.get("response", rec.get("completion"))
    if resp is None:
        return None, None, "missing_response"
    if not isinstance(resp, str):
        return None, None, "response_not_text"
    return rec["prompt"], resp, None


def _where(records, i: int) -> Optional[str]:
    where = getattr(records, "where", None)
    return where[i] if where else None


def _start_report(records) -> DataReport:
    report = DataReport()
    for where, reason in getattr(records, "bad", ()):
        report.skip(reason, where)
    return report


def tokenize_sft(records, tokenizer, seq_len: int, chat: bool = True):
    """SFT records -> ([SFTExample], DataReport). A sequence must fit seq_len + 1 tokens
    (inputs and shifted targets are seq_len each). A record that is not usable (wrong
    types, missing fields, empty response, too long) is skipped and counted, with its
    file:line when `records` is a `Records`."""
    report, out = _start_report(records), []
    for i, rec in enumerate(records):
        prompt, resp, err = _prompt_and_response(rec)
        if err is None and not resp.strip():
            err = "empty_response"
        if err:
            report.skip(err, _where(records, i))
            continue
        p, r = encode_prompt(tokenizer, prompt, chat), _response_ids(tokenizer, resp)
        if len(p) + len(r) > seq_len + 1:
            report.skip("too_long", _where(records, i))
            continue
        out.append(SFTExample(np.asarray(p + r, np.int32),
                              np.asarray([0] * len(p) + [1] * len(r), np.int32)))
        report.kept += 1
    return out, report


def tokenize_pref(records, tokenizer, seq_len: int, chat: bool = True):
    """Preference records -> ([PrefExample], DataReport), skipping (and counting) what
    tokenize_sft does."""
    report, out = _start_report(records), []
    for i, rec in enumerate(records):
        missing = [k for k in ("prompt", "chosen", "rejected") if rec.get(k) is None]
        if missing:
            report.skip("missing_" + missing[0], _where(records, i))
            continue
        if not isinstance(rec["prompt"], str) and not _is_messages(rec["prompt"]):
            report.skip("prompt_not_text", _where(records, i))
            continue
        if not isinstance(rec["chosen"], str) or not isinstance(rec["rejected"], str):
            report.skip("response_not_text", _where(records, i))
            continue
        if not rec["chosen"].strip() or not rec["rejected"].strip():
            report.skip("empty_response", _where(records, i))
            continue
        p = encode_prompt(tokenizer, rec["prompt"], chat)
        c, r = _response_ids(tokenizer, rec["chosen"]), _response_ids(tokenizer, rec["rejected"])
        if len(p) + max(len(c), len(r)) > seq_len + 1:
            report.skip("too_long", _where(records, i))
            continue
        out.append(PrefExample(*(np.asarray(x, np.int32) for x in (p, c, r))))
        report.kept += 1
    return out, report


# ---------------------------------------------------------------------------- batches
def empty_rows(batch: int, seq_len: int) -> Dict[str, np.ndarray]:
    return {"tokens": np.zeros((batch, seq_len), np.int32),
            "targets": np.zeros((batch, seq_len), np.int32),
            "loss_mask": np.zeros((batch, seq_len), np.float32),
            "positions": np.full((batch, seq_len), -1, np.int32),
            "segment_ids": np.zeros((batch, seq_len), np.int32)}


def place_sequence(rows, b, start, ids, response, segment, ex=None):
    """Writes one sequence (inputs ids[:-1], targets ids[1:]) into row b at `start`
    (with its precomputed expert signals, when the rows carry them)."""
    n = len(ids) - 1
    sl = slice(start, start + n)
    if "signal_logprob" in rows:
        rows["signal_logprob"][b, sl] = ex.signal_logprob
        rows["signal_top1"][b, sl] = ex.signal_top1
    rows["tokens"][b, sl] = ids[:-1]
    rows["targets"][b, sl] = ids[1:]
    rows["loss_mask"][b, sl] = response[1:]
    rows["positions"][b, sl] = np.arange(n)
    rows["segment_ids"][b, sl] = segment
    return start + n


class Batcher:
    """Deterministic, resumable batches of fixed shape.

    kind "sft": rows of `seq_len` packed with whole examples (`pack`) or one example per row;
    kind "pref": one pair per row, {"chosen": rows, "rejected": rows}.
    """

    def __init__(self, examples: Sequence, batch_size: int, seq_len: int, seed: int,
                 kind: str = "sft", pack: bool = True):
        if not examples:
            raise DataError("no usable training examples (see the data report)")
        self.examples, self.batch_size, self.seq_len = list(examples), batch_size, seq_len
        self.seed, self.kind, self.pack = seed, kind, pack and kind == "sft"
        self.epoch, self.index = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.examples))

    # -- position, saved with checkpoints
    def state(self) -> Dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def restore(self, state: Dict[str, int]):
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._order = self._permutation(self.epoch)

    def _take(self):
        """The next example of this epoch, or None at the epoch's end."""
        if self.index >= len(self._order):
            return None
        ex = self.examples[self._order[self.index]]
        self.index += 1
        return ex

    def _peek_len(self):
        if self.index >= len(self._order):
            return None
        return len(self.examples[self._order[self.index]].ids) - 1

    def next(self) -> Dict:
        """The next batch; a batch never spans two epochs (the tail is padding)."""
        if self.index >= len(self._order):
            self.epoch += 1
            self.index = 0
            self._order = self._permutation(self.epoch)
        if self.kind == "pref":
            return self._next_pref()
        rows = empty_rows(self.batch_size, self.seq_len)
        sig = self.examples[0].signal_logprob if self.kind == "sft" else None
        if sig is not None:
            n_exp = sig.shape[-1]
            rows["signal_logprob"] = np.zeros((self.batch_size, self.seq_len, n_exp), np.float32)
            rows["signal_top1"] = np.zeros((self.batch_size, self.seq_len, n_exp), np.int32)
        for b in range(self.batch_size):
            start, segment = 0, 1
            while True:
                n = self._peek_len()
                if n is None or start + n > self.seq_len or (segment > 1 and not self.pack):
                    break
                ex = self._take()
                start = place_sequence(rows, b, start, ex.ids, ex.response, segment, ex)
                segment += 1
        return rows

    def _next_pref(self) -> Dict:
        chosen, rejected = (empty_rows(self.batch_size, self.seq_len) for _ in range(2))
        first = self.examples[0]
        if first.ref_logprob is not None:
            n_exp = first.ref_route[0].shape[-1]
            for rows in (chosen, rejected):
                rows["ref_logprob"] = np.zeros((self.batch_size,), np.float32)
                rows["ref_route_logits"] = np.zeros((self.batch_size, self.seq_len, n_exp),
                                                    np.float32)
        for b in range(self.batch_size):
            ex = self._take()
            if ex is None:
                break
            for j, (rows, resp) in enumerate(((chosen, ex.chosen), (rejected, ex.rejected))):
                ids = np.concatenate([ex.prompt, resp])
                mask = np.concatenate([np.zeros_like(ex.prompt), np.ones_like(resp)])
                place_sequence(rows, b, 0, ids, mask, 1)
                if "ref_logprob" in rows:
                    rows["ref_logprob"][b] = ex.ref_logprob[j]
                    rows["ref_route_logits"][b, :len(ids) - 1] = ex.ref_route[j]
        return {"chosen": chosen, "rejected": rejected}

    def steps_per_epoch(self) -> int:
        """Batches in one epoch (exact for unpacked data, an estimate when packing)."""
        if not self.pack:
            return -(-len(self.examples) // self.batch_size)
        tokens = sum(len(e.ids) - 1 for e in self.examples)
        return max(1, -(-tokens // (self.batch_size * self.seq_len)))
