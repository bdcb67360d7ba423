"""Continuous batching on a SpeculativeDecoder (decode.speculate = k): each decode chunk is
`chunk` speculative steps of every slot -- the router drafts k tokens, the selected experts
verify them in one pass (fr_jax/inference/speculative.py) -- so a slot moves on by 1 to
k + 1 tokens a step, by its own amount.

What differs from the plain engine: each slot samples by its own setting inside the
speculative rule (`RowSampling`: greedy rows keep the greedy rule, so a greedy answer is
plain decoding's); a slot stops on the device at its max_tokens (rows would otherwise read
k drafts past it), so an answer needs max_tokens + k cache slots past its prompt; each
request counts its expert passes and kept drafts (`spec_passes`, `spec_accepted`).
"""

from __future__ import annotations

from typing import List

import jax
import numpy as np

from fr_jax.inference.speculative import RowSampling, SpecState
from fr_jax.serving.engine import Engine, Event, SlotState


class SpeculativeEngine(Engine):
    """`Engine` over a `SpeculativeDecoder`; `chunk` counts speculative steps."""

    def __init__(self, decoder, *args, **kwargs):
        self.speculate = decoder.speculate
        super().__init__(decoder, *args, **kwargs)

    def _record_shardings(self, mesh, rows, rep):
        return self.decoder._record_shardings(self.slots)[1]

    def _run_chunk(self, params, state: SlotState, active, eos_ends):
        """Up to `chunk` speculative steps of every slot (an inactive slot is done) ->
        (state, SpecRecord [chunk, S, ...])."""
        done = state.done | ~active
        rows = RowSampling(state.seed, state.temperature, state.top_k, state.top_p)
        spec = SpecState(state.token, done, jax.random.key(0), state.caches, state.count)
        spec, recs = self.decoder._chunk(params, spec, self.eos, self.pad, state.limit,
                                         rows=rows, eos_ends=eos_ends)
        return state._replace(token=spec.token, done=spec.done, count=spec.count,
                              caches=spec.caches), recs

    def _events(self, recs) -> List[Event]:
        tokens, chosen = np.asarray(recs.token), np.asarray(recs.chosen)  # [chunk, S, W]
        emitted, kept = np.asarray(recs.emitted), np.asarray(recs.accepted)  # [chunk, S]
        events = []
        for slot, req in enumerate(self.requests):
            if req is None:
                continue
            new_t, new_e = [], []
            for s in np.flatnonzero(emitted[:, slot]):
                m = int(emitted[s, slot])
                new_t += tokens[s, slot, :m].tolist()
                new_e += chosen[s, slot, :m].tolist()
                req.spec_passes += 1
                req.spec_accepted += int(kept[s, slot])
            events.append(self._add(slot, new_t, new_e))
        return events


def make_engine(decoder, params, slots: int, cache_len: int, eos_ids, pad_id: int,
                buckets=None, place: bool = True) -> Engine:
    """The engine for `decoder`: speculative where it drafts (decode.speculate), else plain."""
    cls = SpeculativeEngine if getattr(decoder, "speculate", 0) else Engine
    return cls(decoder, params, slots, cache_len, eos_ids, pad_id, buckets, place)

