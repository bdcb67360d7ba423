"""Every decode mode over a list of prompts, batched, greedy by default.

A `Lineup` holds what the modes draw on: the router and experts (the FusionRoute modes, see
fusion.py), a SharedTrunkNet selector (mode `sequence`) and named stand-alone models
(baselines such as a fine-tuned or merged model, decoded alone under their own name as a
mode).
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Sequence, Tuple

import numpy as np

from fr_jax.data import encode_prompt
from fr_jax.decode import Decoder, FusedDecoder, decode_slots
from fr_jax.fusion import Mode, ModeError
from fr_jax.sampling import Sampling


@dataclasses.dataclass
class Lineup:
    router: object  # Router or None
    experts: object  # Experts or None
    params: dict  # {"router": ..., "experts": ..., "selector": ... (with a selector)}
    tokenizer: object
    expert_names: Sequence[str]
    models: Dict[str, Tuple[object, dict]] = dataclasses.field(default_factory=dict)
    # name -> (Model, params): stand-alone models decoded as modes of their own
    selector: object = None  # seqroute.Selector for mode `sequence`, or None
    source: dict = dataclasses.field(default_factory=dict)  # {"router", "experts"}: folders
    eos_ids: Sequence[int] = ()  # end-of-sequence ids besides the tokenizer's EOS token
    mesh: object = None  # the mesh the params are placed on: decoders shard batches over it
    lazy_experts: bool = False  # FusedDecoder's lazy experts (the same tokens, faster)
    catch_up_width: int = 8


@dataclasses.dataclass
class Generations:
    """Answers of one mode: per prompt the text, the token ids and the source of each token
    (expert index, -1 the router alone; stand-alone models: 0)."""

    mode: str
    texts: List[str]
    tokens: List[List[int]]
    chosen: List[List[int]]
    seconds: float


def _decoder(lineup: Lineup, mode: str, sampling: Sampling, chunk: int):
    if mode in lineup.models:
        return (Decoder(lineup.models[mode][0], sampling, chunk, lineup.mesh),
                lineup.models[mode][1])
    m = Mode.parse(mode, lineup.experts.n if lineup.experts else None)
    if m.kind == "model":
        raise ModeError(f"mode {mode!r} needs its model in the lineup (models: "
                        f"{sorted(lineup.models) or 'none'})")
    if (m.uses_router and lineup.router is None) or (m.uses_experts and lineup.experts is None):
        raise ModeError(f"mode {mode!r} needs models this lineup does not have")
    dec = FusedDecoder(m, lineup.router, lineup.experts, vocab=len(lineup.tokenizer),
                       sampling=sampling, chunk=chunk, mesh=lineup.mesh,
                       selector=lineup.selector, lazy_experts=lineup.lazy_experts,
                       catch_up_width=lineup.catch_up_width)
    return dec, lineup.params


class ModeRunner:
    """One mode of a lineup, compiled once: decodes batches of token-id prompts, each padded
    to `batch_size` rows (with copies of its first prompt) and, with `width`, left-padded
    to that many tokens, into a cache of `cache_len` slots, so every batch reuses one
    compiled prefill and decode step."""

    def __init__(self, lineup: Lineup, mode: str, max_new_tokens: int, batch_size: int,
                 cache_len: int, sampling: Sampling = Sampling(), chunk: int = 8,
                 width: int = 0):
        self.lineup, self.mode = lineup, mode
        self.dec, self.params = _decoder(lineup, mode, sampling, chunk)
        self.max_new_tokens, self.batch_size, self.cache_len = max_new_tokens, batch_size, cache_len
        self.width = width
        tok = lineup.tokenizer
        self.eos = sorted(set(lineup.eos_ids) | {tok.eos_token_id} - {None})
        self.pad = tok.pad_token_id if tok.pad_token_id is not None else 0

    def run(self, ids: Sequence[Sequence[int]], seed: int = 0):
        """-> (texts, token ids, per-token sources, seconds) of the `len(ids)` <= batch_size
        prompts."""
        n = len(ids)
        part = list(ids) + [ids[0]] * (self.batch_size - n)
        res = self.dec.generate(self.params, part, self.max_new_tokens, self.eos, self.pad,
                                seed=seed, cache_len=self.cache_len, width=self.width)
        rows = [res.row(b) for b in range(n)]
        texts = [self.lineup.tokenizer.decode(t, skip_special_tokens=True) for t, _ in rows]
        return (texts, [t for t, _ in rows], [c for _, c in rows],
                res.seconds_prefill + res.seconds_decode)


def encode(lineup: Lineup, prompts: Sequence[str], chat: bool = True) -> List[List[int]]:
    return [encode_prompt(lineup.tokenizer, p, chat) for p in prompts]


def cache_slots(ids: Sequence[Sequence[int]], max_new_tokens: int, chunk: int) -> int:
    """Cache length that holds the longest prompt and the decoded tokens."""
    return max(len(x) for x in ids) + decode_slots(max_new_tokens, chunk)


def generate(lineup: Lineup, mode: str, prompts: Sequence[str], max_new_tokens: int,
             batch_size: int = 256, chat: bool = True, sampling: Sampling = Sampling(),
             seed: int = 0, chunk: int = 8, progress=None) -> Generations:
    """Decodes `prompts` with `mode` in batches of `batch_size` (see ModeRunner)."""
    ids = encode(lineup, prompts, chat)
    batch_size = min(batch_size, len(ids))
    runner = ModeRunner(lineup, mode, max_new_tokens, batch_size,
                        cache_slots(ids, max_new_tokens, chunk), sampling, chunk)
    texts, tokens, chosen, seconds = [], [], [], 0.0
    for lo in range(0, len(ids), batch_size):
        t, k, c, s = runner.run(ids[lo:lo + batch_size], seed=seed + lo)
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
