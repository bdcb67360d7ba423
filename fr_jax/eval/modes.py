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
        return Decoder(lineup.models[mode][0], sampling, chunk), lineup.models[mode][1]
    m = Mode.parse(mode, lineup.experts.n if lineup.experts else None)
    if m.kind == "model":
        raise ModeError(f"mode {mode!r} needs its model in the lineup (models: "
                        f"{sorted(lineup.models) or 'none'})")
    if (m.uses_router and lineup.router is None) or (m.uses_experts and lineup.experts is None):
        raise ModeError(f"mode {mode!r} needs models this lineup does not have")
    dec = FusedDecoder(m, lineup.router, lineup.experts, vocab=len(lineup.tokenizer),
                       sampling=sampling, chunk=chunk, selector=lineup.selector)
    return dec, lineup.params


def generate(lineup: Lineup, mode: str, prompts: Sequence[str], max_new_tokens: int,
             batch_size: int = 256, chat: bool = True, sampling: Sampling = Sampling(),
             seed: int = 0, chunk: int = 8, progress=None) -> Generations:
    """Decodes `prompts` with `mode`. Batches are padded to `batch_size` rows (the last one
    with copies of its first prompt) so the decoder compiles once per mode."""
    tok = lineup.tokenizer
    dec, params = _decoder(lineup, mode, sampling, chunk)
    ids = [encode_prompt(tok, p, chat) for p in prompts]
    eos = [tok.eos_token_id]
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    batch_size = min(batch_size, len(ids))
    width = max(len(x) for x in ids)
    cache_len = width + decode_slots(max_new_tokens, chunk)
    texts, tokens, chosen, seconds = [], [], [], 0.0
    for lo in range(0, len(ids), batch_size):
        part = ids[lo:lo + batch_size]
        n = len(part)
        part = part + [part[0]] * (batch_size - n)
        res = dec.generate(params, part, max_new_tokens, eos, pad, seed=seed + lo,
                           cache_len=cache_len)
        seconds += res.seconds_prefill + res.seconds_decode
        for b in range(n):
            toks, src = res.row(b)
            tokens.append(toks)
            chosen.append(src)
            texts.append(tok.decode(toks, skip_special_tokens=True))
        if progress is not None:
            progress.update(n)
    return Generations(mode, texts, tokens, chosen, seconds)


def token_shares(chosen_rows: Sequence[Sequence[int]], n_experts: int) -> np.ndarray:
    """Share of generated tokens per expert (index i) and for the router alone (last
    entry) over rows of per-token sources: [n_experts + 1], summing to 1 (0s if empty)."""
    counts = np.zeros(n_experts + 1)
    for row in chosen_rows:
        for c in row:
            counts[c if c >= 0 else n_experts] += 1
    return counts / max(counts.sum(), 1)
