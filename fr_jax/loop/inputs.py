"""A training stage's data on this process: the streams whose rows its devices hold
(fr_jax.corpus.streams), read and tokenized, and the data report of the whole file,
gathered from the processes (each stream counted by one)."""

from __future__ import annotations

import dataclasses
import os
from typing import Dict, List

import jax
import numpy as np

from fr_jax.corpus import DataReport, load_records, tokenize_pref, tokenize_sft
from fr_jax.corpus.streams import Layout, auto_streams, split_entries
from fr_jax.runtime import distributed
from fr_jax.runtime import sharding as sh
from fr_jax.runtime.errors import DataError


FORMATS = "JSONL, JSON, Parquet or a folder saved with datasets"


@dataclasses.dataclass
class StageData:
    layout: Layout
    train: Dict[int, list]  # stream -> its training examples, in the stream's order
    held: Dict[int, list]  # stream -> its held-out examples (the eval loss)
    report: DataReport  # the whole file's
    n_train: int  # examples over every stream
    n_held: int
    n_read: int  # entries this process read
    n_entries: int  # entries in the file

    def examples(self) -> Dict[int, list]:
        """Every example of this process's streams, training then held-out, per stream."""
        return {s: self.train[s] + self.held[s] for s in self.train}

    def attach(self, examples: Dict[int, list]):
        """Puts back `examples()` after a computation returned them (same order)."""
        for s, ex in examples.items():
            n = len(self.train[s])
            self.train[s], self.held[s] = ex[:n], ex[n:]


def layout_for(mesh, batch_size: int, n_streams: int) -> Layout:
    """The stream layout of a stage's batches on `mesh`; n_streams 0 picks the default
    (`auto_streams`)."""
    blocks = tuple(sh.row_holders(mesh, batch_size))
    return Layout(n_streams or auto_streams(blocks, batch_size), batch_size, blocks,
                  jax.process_index())


def check_data_path(path: str, kind: str):
    """Raises DataError naming the config field when a stage's data file (kind sft | pref)
    is not set or does not exist."""
    field = "data.sft_path" if kind == "sft" else "data.pref_path"
    what = ("SFT examples (prompt, response)" if kind == "sft"
            else "preference pairs (prompt, chosen, rejected)")
    if not path:
        raise DataError(f"no training data: --config.{field} is not set; point it at the "
                        f"{what}: {FORMATS}")
    if not os.path.exists(path):
        raise DataError(f"--config.{field}={path!r} does not exist; point it at the {what}: "
                        f"{FORMATS}")


def load_stage_data(path: str, kind: str, tokenizer, dc, layout: Layout) -> StageData:
    """Reads and tokenizes the entries of `path` that this process's streams hold; the
    report and counts cover the whole file (a collective where there are several
    processes)."""
    check_data_path(path, kind)
    tokenize = tokenize_sft if kind == "sft" else tokenize_pref
    mine = layout.mine()
    parts = {}

    def select(n):
        parts["train"], parts["held"] = split_entries(n, layout.n_streams, dc.eval_fraction,
                                                      dc.seed)
        return np.concatenate([np.zeros(0, int)] + [parts[p][s] for s in mine
                                                    for p in ("train", "held")])

    records = load_records(path, strict=False, select=select)
    train: Dict[int, list] = {}
    held: Dict[int, list] = {}
    said = {}  # stream -> (report, train count, held count), for the streams this one leads
    for s in mine:
        train[s], r_train = tokenize(records.subset(parts["train"][s]), tokenizer,
                                     dc.seq_len, dc.chat)
        held[s], r_held = tokenize(records.subset(parts["held"][s]), tokenizer, dc.seq_len,
                                   dc.chat)
        if layout.leads(s):
            report = DataReport.merged([r_train.to_json(), r_held.to_json()])
            said[s] = (report.to_json(), len(train[s]), len(held[s]))
    n_read = len(records) + len(records.bad)
    merged: Dict[str, list] = {}
    for part in distributed.gather({str(s): v for s, v in said.items()}):
        merged.update(part)
    values: List = list(merged.values())
    return StageData(layout, train, held, DataReport.merged([v[0] for v in values]),
                     sum(v[1] for v in values), sum(v[2] for v in values), n_read,
                     records.n_entries)
