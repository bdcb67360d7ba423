"""Records: local data files (JSONL / JSON / Parquet / a `save_to_disk` folder) -> lists of
dicts, each with where it came from ("file:line" or "file[i]"), bad entries counted."""

from __future__ import annotations

import gzip
import json
import os
from typing import Callable, Iterable, List, Optional, Tuple

from fr_jax.runtime.errors import DataError


class Records(list):
    """The records of one data file, in order (a list of dicts), with `where[i]` naming
    record i ("file:line" for JSON lines, "file[i]" otherwise) and `bad`, the (where,
    reason) of every entry that is not a JSON object at all (read with strict=False).

    An entry is a non-blank line (JSONL), an array element (JSON) or a row (Parquet,
    datasets folder), good or bad; `entries[i]` / `bad_entries[j]` are the entry numbers of
    record i / bad entry j, and `n_entries` how many the file holds (read or not)."""

    def __init__(self, rows=(), where=(), bad=(), entries=None, bad_entries=(),
                 n_entries=None):
        super().__init__(rows)
        self.where, self.bad = list(where), list(bad)
        self.entries = list(range(len(self))) if entries is None else list(entries)
        self.bad_entries = list(bad_entries)
        self.n_entries = len(self) + len(self.bad) if n_entries is None else n_entries

    def subset(self, entries) -> "Records":
        """The records and bad entries among the entry numbers `entries`, in that order."""
        rows = {e: i for i, e in enumerate(self.entries)}
        bad = {e: j for j, e in enumerate(self.bad_entries)}
        r = [rows[e] for e in entries if e in rows]
        b = [bad[e] for e in entries if e in bad]
        return Records([self[i] for i in r], [self.where[i] for i in r],
                       [self.bad[j] for j in b], [self.entries[i] for i in r],
                       [self.bad_entries[j] for j in b], self.n_entries)


def _json_entries(path: str, select: Optional[Callable[[int], Iterable[int]]] = None):
    """(number of entries, [(entry, where, object or None, reason)]) of a JSON-lines file or
    a JSON array, each entry read as the JSON it is: a string stays a string however it
    looks ("62", "[108]"). With `select` (entry count -> the entries wanted) only those
    lines are parsed: the JSON of other processes' records is never decoded."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8", errors="replace") as f:
        text = f.read()
    if text.lstrip().startswith("["):  # a .json file holding one array of records
        try:
            array = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not a valid JSON array ({e.msg}, line {e.lineno}); "
                            "write one JSON object per line (JSONL) instead") from None
        wanted = range(len(array)) if select is None else sorted(set(select(len(array))))
        return len(array), [(i, f"{path}[{i}]", array[i],
                             None if isinstance(array[i], dict) else "not_an_object")
                            for i in wanted]
    lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    del text
    wanted = range(len(lines)) if select is None else sorted(set(select(len(lines))))
    out = []
    for i in wanted:
        n, line = lines[i]
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            out.append((i, f"{path}:{n}", None, "bad_json"))
            continue
        out.append((i, f"{path}:{n}", rec, None if isinstance(rec, dict) else "not_an_object"))
    return len(lines), out


def _rows(ds, path: str, select) -> Records:
    """A datasets table's rows (all, or the entries `select` picks) as Records."""
    n = len(ds)
    wanted = list(range(n)) if select is None else sorted(set(select(n)))
    if select is not None:
        ds = ds.select(wanted)
    return Records(ds, (f"{path}[{i}]" for i in wanted), entries=wanted, n_entries=n)


def load_records(path: str, split: Optional[str] = None, strict: bool = True,
                 select: Optional[Callable[[int], Iterable[int]]] = None) -> Records:
    """The records of a local JSONL / JSON (optionally .gz) / Parquet file or a folder saved
    with `datasets`. JSON is read line by line as written (no type inference across the
    file); an entry that is not a JSON object is a DataError naming file:line, or with
    strict=False is kept in `Records.bad` for the caller to count. `select`: a function of
    the file's entry count returning the entry numbers to read (the rest is not decoded)."""
    if not path:
        raise DataError("no data file given (an empty path); name the file to read")
    if os.path.isdir(path):
        import datasets

        try:
            ds = datasets.load_from_disk(path)
        except Exception as e:  # datasets raises several types for a non-dataset folder
            raise DataError(f"{path!r} is not a folder saved with Dataset.save_to_disk: {e}") \
                from None
        if isinstance(ds, datasets.DatasetDict):
            ds = ds[split or "train"]
        return _rows(ds, path, select)
    if not os.path.isfile(path):
        raise DataError(f"data file {path!r} not found (expected .jsonl, .json (optionally "
                        ".gz) or .parquet, or a folder saved with datasets)")
    if os.path.getsize(path) == 0:
        raise DataError(f"data file {path!r} is empty")
    if path.endswith((".jsonl", ".json", ".jsonl.gz", ".json.gz")):
        n_entries, entries = _json_entries(path, select)
        out = Records(n_entries=n_entries)
        for entry, where, rec, reason in entries:
            if reason is None:
                out.append(rec)
                out.where.append(where)
                out.entries.append(entry)
            elif strict:
                raise DataError(f"{where}: " + ("not valid JSON" if reason == "bad_json" else
                                                "not a JSON object") + " (one JSON object "
                                "per line expected)")
            else:
                out.bad.append((where, reason))
                out.bad_entries.append(entry)
        if not n_entries:
            raise DataError(f"data file {path!r} is empty (no records, only blank lines)")
        return out
    if not path.endswith(".parquet"):
        raise DataError(f"{path!r}: unknown data format; use .jsonl, .json or .parquet")
    import datasets

    try:
        ds = datasets.load_dataset("parquet", data_files=path, split="train")
    except Exception as e:
        raise DataError(f"cannot read {path!r} as parquet: {e}") from None
    return _rows(ds, path, select)


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


def prompt_lines(path: str) -> List[Tuple[str, str]]:
    """(file:line, prompt) for every prompt of a JSONL file with a string "prompt" field on
    every non-blank line. An empty prompt is refused with its line: it is a mistake (a
    template not filled in), and would otherwise fail, or decode noise, far from the file."""
    out = []
    for n, rec in jsonl_objects(path, "prompts file", 'one {"prompt": "..."} object per line'):
        if not isinstance(rec.get("prompt"), str):
            raise DataError(f'{path}:{n}: expected an object with a string "prompt" field')
        if not rec["prompt"].strip():
            raise DataError(f'{path}:{n}: the prompt is empty; write one or delete the line '
                            "(blank lines are skipped)")
        out.append((f"{path}:{n}", rec["prompt"]))
    if not out:
        raise DataError(f"prompts file {path!r} has no prompts")
    return out


def read_prompts(path: str) -> List[str]:
    """Prompts from a JSONL file with a string "prompt" field on every line (`prompt_lines`)."""
    return [p for _, p in prompt_lines(path)]
