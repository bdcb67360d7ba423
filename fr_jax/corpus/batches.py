"""Batches: token-id examples -> fixed-shape [batch, seq_len] rows, deterministic and
resumable.

`Batcher` shuffles by (seed, epoch), packs (SFT) or pads examples into rows so the step
compiles once, and has a position (epoch, index) that a checkpoint saves: a restart
continues from the same example, and within an epoch no example is seen twice or skipped.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from fr_jax.runtime.errors import DataError


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


def place_side(rows, b, pair, side: str) -> int:
    """Writes one side ("chosen" or "rejected") of a preference pair into row b: the prompt
    unscored, the response scored, one segment from the row's start."""
    response = getattr(pair, side)
    ids = np.concatenate([pair.prompt, response])
    mask = np.concatenate([np.zeros_like(pair.prompt), np.ones_like(response)])
    return place_sequence(rows, b, 0, ids, mask, 1)


def pack_batch(length: Callable[[int], int], count: int, rows: int, seq_len: int,
               pack: bool) -> List[Tuple[int, int, int, int]]:
    """The one packing rule of SFT rows: placements (item, row, start, segment) of the
    first of `count` items (item i of `length(i)` tokens) that fill one batch of `rows`
    rows of seq_len, in order -- consecutive items as segments of a row (`pack`), else one
    item per row. An item that does not fit the rest of a row starts the next row."""
    out, i = [], 0
    for r in range(rows):
        start, segment = 0, 1
        while i < count and (pack or segment == 1) and start + length(i) <= seq_len:
            out.append((i, r, start, segment))
            start, segment, i = start + length(i), segment + 1, i + 1
    return out


class Batcher:
    """Deterministic, resumable batches of fixed shape.

    kind "sft": rows of `seq_len` packed with whole examples (`pack`) or one example per row;
    kind "pref": one pair per row, {"chosen": rows, "rejected": rows}.
    """

    def __init__(self, examples: Sequence, batch_size: int, seq_len: int, seed: int,
                 kind: str = "sft", pack: bool = True, stream: Optional[int] = None,
                 signals: Optional[int] = None, reference: Optional[int] = None,
                 allow_empty: bool = False):
        """`stream`: this batcher is stream `stream` of several (its own shuffles, see
        fr_jax.corpus.streams). `signals` / `reference`: the experts' count when the rows
        carry precomputed expert signals (sft) / a CDPO reference (pref), 0 when not;
        None reads it from the first example. `allow_empty`: a batcher without examples
        gives padding rows (a stream whose records were all unusable) instead of failing."""
        if not examples and not allow_empty:
            raise DataError("no usable training examples (see the data report)")
        self.examples, self.batch_size, self.seq_len = list(examples), batch_size, seq_len
        self.seed, self.kind, self.pack = seed, kind, pack and kind == "sft"
        self.stream = stream
        first = self.examples[0] if self.examples else None
        if signals is None:
            signals = (first.signal_logprob.shape[-1] if kind == "sft" and first is not None
                       and first.signal_logprob is not None else 0)
        if reference is None:
            reference = (first.ref_route[0].shape[-1] if kind == "pref" and first is not None
                         and first.ref_logprob is not None else 0)
        self.signals, self.reference = signals, reference
        self.epoch, self.index = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        key = [self.seed, epoch] if self.stream is None else [self.seed, self.stream, epoch]
        return np.random.default_rng(key).permutation(len(self.examples))

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

    def empty(self) -> Dict:
        """A batch of padding rows shaped like this batcher's batches."""
        if self.kind == "pref":
            sides = {}
            for side in ("chosen", "rejected"):
                rows = sides[side] = empty_rows(self.batch_size, self.seq_len)
                if self.reference:
                    rows["ref_logprob"] = np.zeros((self.batch_size,), np.float32)
                    rows["ref_route_logits"] = np.zeros(
                        (self.batch_size, self.seq_len, self.reference), np.float32)
            return sides
        rows = empty_rows(self.batch_size, self.seq_len)
        if self.signals:
            shape = (self.batch_size, self.seq_len, self.signals)
            rows["signal_logprob"] = np.zeros(shape, np.float32)
            rows["signal_top1"] = np.zeros(shape, np.int32)
        return rows

    def next(self) -> Dict:
        """The next batch; a batch never spans two epochs (the tail is padding)."""
        if not self.examples:
            return self.empty()
        if self.index >= len(self._order):
            self.epoch += 1
            self.index = 0
            self._order = self._permutation(self.epoch)
        if self.kind == "pref":
            return self._next_pref()
        rows = self.empty()
        upcoming = lambda i: self.examples[self._order[self.index + i]]
        for _, b, start, segment in pack_batch(lambda i: len(upcoming(i).ids) - 1,
                                               len(self._order) - self.index,
                                               self.batch_size, self.seq_len, self.pack):
            ex = self._take()
            place_sequence(rows, b, start, ex.ids, ex.response, segment, ex)
        return rows

    def _next_pref(self) -> Dict:
        batch = self.empty()
        chosen, rejected = batch["chosen"], batch["rejected"]
        for b in range(self.batch_size):
            ex = self._take()
            if ex is None:
                break
            for j, (rows, side) in enumerate(((chosen, "chosen"), (rejected, "rejected"))):
                n = place_side(rows, b, ex, side)
                if "ref_logprob" in rows:
                    rows["ref_logprob"][b] = ex.ref_logprob[j]
                    rows["ref_route_logits"][b, :n] = ex.ref_route[j]
        return batch

    def steps_per_epoch(self) -> int:
        """Batches in one epoch (exact for unpacked data, an estimate when packing)."""
        if not self.pack:
            return -(-len(self.examples) // self.batch_size)
        tokens = sum(len(e.ids) - 1 for e in self.examples)
        return max(1, -(-tokens // (self.batch_size * self.seq_len)))
