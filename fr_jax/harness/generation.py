"""Any decode mode of a lineup (fr_jax/inference/lineup.py) over a list of prompts, in fixed-shape
batches, greedy by default."""

from __future__ import annotations

import dataclasses
from typing import List, Sequence

import numpy as np

from fr_jax.corpus import encode_prompt
from fr_jax.inference import answer_slots
from fr_jax.inference.lineup import Lineup
from fr_jax.inference.sampling import Sampling


@dataclasses.dataclass
class Generations:
    """Answers of one mode: per prompt the text, the token ids and the source of each token
    (expert index, -1 the router alone; stand-alone models: 0)."""

    mode: str
    texts: List[str]
    tokens: List[List[int]]
    chosen: List[List[int]]
    seconds: float


class ModeRunner:
    """One mode of a lineup, compiled once: decodes batches of token-id prompts, each padded
    to `batch_size` rows (with copies of its first prompt) and, with `width`, left-padded
    to that many tokens, into a cache of `cache_len` slots, so every batch reuses one
    compiled prefill and decode step."""

    def __init__(self, lineup: Lineup, mode: str, max_new_tokens: int, batch_size: int,
                 cache_len: int, sampling: Sampling = Sampling(), chunk: int = 8,
                 width: int = 0):
        self.lineup, self.mode = lineup, mode
        self.dec, self.params = lineup.decoder(mode, sampling, chunk)
        self.max_new_tokens, self.batch_size, self.cache_len = max_new_tokens, batch_size, cache_len
        self.width = width
        self.eos, self.pad = list(lineup.eos_ids), lineup.pad_id

    def run(self, ids: Sequence[Sequence[int]], seed: int = 0):
        """-> (texts, token ids, per-token sources, seconds, speculation) of the `len(ids)`
        <= batch_size prompts; speculation: per prompt [expert passes, drafts kept], or
        None when the mode decodes without drafts."""
        n = len(ids)
        part = list(ids) + [ids[0]] * (self.batch_size - n)
        res = self.dec.generate(self.params, part, self.max_new_tokens, self.eos, self.pad,
                                seed=seed, cache_len=self.cache_len, width=self.width)
        rows = [res.row(b) for b in range(n)]
        texts = [self.lineup.tokenizer.decode(t, skip_special_tokens=True) for t, _ in rows]
        spec = None if not res.speculate else [
            [int(res.spec_passes[b]), int(res.spec_accepted[b])] for b in range(n)]
        return (texts, [t for t, _ in rows], [c for _, c in rows],
                res.seconds_prefill + res.seconds_decode, spec)


def encode(lineup: Lineup, prompts: Sequence[str], chat: bool = True) -> List[List[int]]:
    return [encode_prompt(lineup.tokenizer, p, chat) for p in prompts]


def cache_slots(ids: Sequence[Sequence[int]], max_new_tokens: int, chunk: int,
                speculate: int = 0) -> int:
    """Cache length that holds the longest prompt and the decoded tokens (and, speculating,
    the drafted tokens past them)."""
    return max(len(x) for x in ids) + answer_slots(max_new_tokens, chunk, speculate)


def generate(lineup: Lineup, mode: str, prompts: Sequence[str], max_new_tokens: int,
             batch_size: int = 256, chat: bool = True, sampling: Sampling = Sampling(),
             seed: int = 0, chunk: int = 8, progress=None) -> Generations:
    """Decodes `prompts` with `mode` in batches of `batch_size` (see ModeRunner)."""
    ids = encode(lineup, prompts, chat)
    batch_size = min(batch_size, len(ids))
    runner = ModeRunner(lineup, mode, max_new_tokens, batch_size,
                        cache_slots(ids, max_new_tokens, chunk, lineup.speculate), sampling,
                        chunk)
    texts, tokens, chosen, seconds = [], [], [], 0.0
    for lo in range(0, len(ids), batch_size):
        t, k, c, s, _ = runner.run(ids[lo:lo + batch_size], seed=seed + lo)
        texts += t
        tokens += k
        chosen += c
        seconds += s
        if progress is not None:
            progress.update(len(t))
    return Generations(mode, texts, tokens, chosen, seconds)


def token_shares(chosen_rows: Sequence[Sequence[int]], n_experts: int) -> np.ndarray:
    """Share of generated tokens per expert (index i) and for the router alone (last
    entry) over rows of per-token sources: [n_experts + 1], summing to 1 (0s if empty)."""
    counts = np.zeros(n_experts + 1)
    for row in chosen_rows:
        for c in row:
            counts[c if c >= 0 else n_experts] += 1
    return counts / max(counts.sum(), 1)
