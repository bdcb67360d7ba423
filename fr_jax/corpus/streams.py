"""Data streams: the rows of every global batch split between the processes of a launch, so
that each process reads and tokenizes only the records its own devices train on.

A stage's file is dealt once, by seed, into S streams (`data.streams`, fixed when the stage
first starts and kept in its run.json): the held-out entries (`data.eval_fraction`) and the
rest each go round-robin over the streams in one seeded order. Stream s fills rows
[s B/S, (s+1) B/S) of every batch of B rows from its own examples, shuffled by
(seed, s, epoch) and packed, with its own position (epoch, index). A process reads the
streams whose rows lie on its devices; a checkpoint keeps every stream's position, so a run
resumes on any number of processes and sees the same batches. With S = 1 the batches are
those of one `Batcher` over every example (the layout of a single process).
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Sequence, Tuple

import numpy as np

from fr_jax.corpus.batches import Batcher
from fr_jax.runtime.errors import DataError

Block = Tuple[int, int, frozenset]  # rows [start, stop) of a batch, the processes holding them


def split_entries(n: int, n_streams: int, eval_fraction: float, seed: int):
    """(train, eval): per stream, the entry numbers (of a file of n entries) it holds, in
    the stream's order. One seeded permutation decides both: its first round(n x fraction)
    entries (at least one, when the fraction is positive and n >= 2) are held out, and each
    part is dealt round-robin over the streams."""
    order = np.random.default_rng([seed, 12345]).permutation(n)
    n_eval = max(1, int(round(n * eval_fraction))) if eval_fraction > 0 and n >= 2 else 0
    held, rest = order[:n_eval], order[n_eval:]
    return ([rest[s::n_streams] for s in range(n_streams)],
            [held[s::n_streams] for s in range(n_streams)])


def auto_streams(blocks: Sequence[Block], batch_size: int) -> int:
    """The default stream count: one per run of consecutive row blocks held by the same
    processes (one per host on a pod, 1 in one process), when those runs are equal and
    divide the batch; else 1."""
    runs: List[List[Block]] = []
    for b in blocks:
        if runs and runs[-1][-1][2] == b[2]:
            runs[-1].append(b)
        else:
            runs.append([b])
    n = len(runs)
    sizes = {r[-1][1] - r[0][0] for r in runs}
    return n if len(sizes) == 1 and batch_size % n == 0 else 1


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where the streams' rows of a training batch lie: `blocks` are the batch's row blocks
    on the mesh (`sharding.row_holders`) and `process` is this process."""

    n_streams: int
    batch_size: int
    blocks: Tuple[Block, ...]
    process: int = 0

    def __post_init__(self):
        if self.n_streams < 1 or self.batch_size % self.n_streams:
            raise DataError(f"data.streams={self.n_streams} does not divide "
                            f"train.batch_size={self.batch_size}: every stream fills an equal "
                            "share of each batch's rows")

    @property
    def rows_per_stream(self) -> int:
        return self.batch_size // self.n_streams

    def rows(self, s: int) -> Tuple[int, int]:
        r = self.rows_per_stream
        return s * r, (s + 1) * r

    def blocks_of(self, s: int) -> List[int]:
        """The row blocks that overlap stream s's rows."""
        lo, hi = self.rows(s)
        return [k for k, (a, b, _) in enumerate(self.blocks) if a < hi and lo < b]

    def holders(self, s: int) -> frozenset:
        """The processes that hold any of stream s's rows (each reads the stream)."""
        return frozenset().union(*(self.blocks[k][2] for k in self.blocks_of(s)))

    def mine(self) -> List[int]:
        """The streams this process reads."""
        return [s for s in range(self.n_streams) if self.process in self.holders(s)]

    def leads(self, s: int) -> bool:
        """Whether this process speaks for stream s (counts it, writes its caches): the
        lowest-numbered of its holders."""
        return min(self.holders(s)) == self.process

    def work(self, sizes: Dict[int, int]) -> Dict[int, List[Tuple[int, int]]]:
        """A once-per-stage computation over this process's examples, spread over the row
        blocks (a batch shaped like a training batch, with the same blocks): for every
        block this process holds, the (stream, example) pairs it computes. Within the
        blocks of a stream that share one set of holders, the stream's examples are cut
        into equal consecutive parts, one per block, so every holder of the stream finds
        each of its results on its own devices (several sets of holders each compute the
        stream: only where a stream spans hosts, as after a resume on more hosts).
        `sizes`: examples per stream, for the streams this process reads."""
        out: Dict[int, List[Tuple[int, int]]] = {
            k: [] for k, b in enumerate(self.blocks) if self.process in b[2]}
        for s in self.mine():
            groups: Dict[frozenset, List[int]] = {}
            for k in self.blocks_of(s):
                groups.setdefault(self.blocks[k][2], []).append(k)
            for ks in groups.values():
                for k, part in zip(ks, np.array_split(np.arange(sizes[s]), len(ks))):
                    if k in out:
                        out[k].extend((s, int(i)) for i in part)
        return out


def _as_streams(state: Dict) -> Dict:
    """A checkpoint's data position as {"streams", "positions"}; one saved before streams,
    a single (epoch, index), is one stream."""
    if "streams" in state:
        return state
    return {"streams": 1, "positions": [[state["epoch"], state["index"]]]}


class StreamBatcher:
    """Batches of `layout.batch_size` rows in which this process fills the rows of its
    streams (one `Batcher` each, `examples[s]` its examples); other rows stay padding,
    never read (each process places only its own devices' shards)."""

    def __init__(self, layout: Layout, examples: Dict[int, list], seq_len: int, seed: int,
                 kind: str = "sft", pack: bool = True, signals: int = 0, reference: int = 0):
        self.layout = layout
        single = layout.n_streams == 1
        self.batchers = {
            s: Batcher(examples.get(s, []), layout.rows_per_stream, seq_len, seed, kind, pack,
                       stream=None if single else s, signals=signals, reference=reference,
                       allow_empty=True)
            for s in layout.mine()}
        self._led = [s for s in self.batchers if layout.leads(s)]  # counted by this process
        self._shape = Batcher([], layout.batch_size, seq_len, seed, kind, pack,
                              signals=signals, reference=reference, allow_empty=True)

    def next(self) -> Dict:
        batch = self._shape.empty()
        for s, b in self.batchers.items():
            lo, hi = self.layout.rows(s)
            part = b.next()
            for side in (("chosen", "rejected") if "chosen" in batch else (None,)):
                dst, src = (batch, part) if side is None else (batch[side], part[side])
                for k, v in src.items():
                    dst[k][lo:hi] = v
        return batch

    def tokens(self, batch) -> int:
        """Tokens of `batch` in the streams this process speaks for (summed over the
        processes: the batch's tokens, each counted once)."""
        sides = [batch["chosen"], batch["rejected"]] if "chosen" in batch else [batch]
        total = 0
        for s in self._led:
            lo, hi = self.layout.rows(s)
            total += int(sum((x["segment_ids"][lo:hi] > 0).sum() for x in sides))
        return total

    def first_epoch_done(self) -> bool:
        """Whether each of this process's streams has given all of its first epoch."""
        return all(b.epoch > 0 or b.index >= len(b.examples) for b in self.batchers.values())

    # -- position, saved with checkpoints: every stream's, gathered from its readers
    def positions(self) -> Dict[int, List[int]]:
        """This process's streams' positions, {stream: [epoch, index]}."""
        return {s: [b.epoch, b.index] for s, b in self.batchers.items()}

    @staticmethod
    def state(n_streams: int, gathered: Sequence[Dict]) -> Dict:
        """The checkpoint's data position from every process's `positions()` (JSON keys)."""
        pos: Dict[int, List[int]] = {}
        for p in gathered:
            for s, v in p.items():
                pos[int(s)] = list(v)
        missing = [s for s in range(n_streams) if s not in pos]
        if missing:
            raise DataError(f"no process reads data stream {missing[0]}")
        return {"streams": n_streams, "positions": [pos[s] for s in range(n_streams)]}

    def restore(self, state: Dict):
        """Continues from a checkpoint's data position (also one saved before streams: a
        single (epoch, index), which is one stream)."""
        state = _as_streams(state)
        if state["streams"] != self.layout.n_streams:
            raise DataError(f"the checkpoint's data position has {state['streams']} streams, "
                            f"this run {self.layout.n_streams}")
        for s, b in self.batchers.items():
            epoch, index = state["positions"][s]
            b.restore({"epoch": epoch, "index": index})

    @staticmethod
    def describe(state: Dict) -> str:
        """A checkpoint's data position in words."""
        pos = _as_streams(state)["positions"]
        if len(pos) == 1:
            return f"epoch {pos[0][0]}, example {pos[0][1]}"
        return "streams " + "; ".join(f"{s}: epoch {e}, example {i}"
                                      for s, (e, i) in enumerate(pos))
