"""Records: local data files (JSONL / JSON / Parquet / a `save_to_disk` folder) -> lists of
dicts, each with where it came from ("file:line" or "file[i]"), bad entries counted."""

from __future__ import annotations

import gzip
import json
import os
from typing import List, Optional

from fr_jax.errors import DataError


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
