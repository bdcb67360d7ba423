"""Inference: the chunked decoder and the plain `Decoder` (core.py), FusionRoute's
`FusedDecoder` (fused.py), its lazy-experts schedule (lazy.py) and its self-speculative
form (speculative.py: the router drafts, the experts verify a chunk), the next-token sampling
rules (sampling.py), routing traces (trace.py), and the lineup every entry point loads its
models through (lineup.py)."""

from fr_jax.inference.core import (PADDING, ChunkedDecoder, DecodeResult, Decoder,  # noqa: F401
                                   answer_slots, decode_slots, left_pad)
from fr_jax.inference.fused import FusedDecoder  # noqa: F401
from fr_jax.inference.lazy import catch_up_widths  # noqa: F401
from fr_jax.inference.speculative import SpeculativeDecoder, speculates  # noqa: F401
