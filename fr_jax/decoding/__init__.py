"""Decoding: the chunked decoder and the plain `Decoder` (core.py), FusionRoute's
`FusedDecoder` (fused.py) and its lazy-experts schedule (lazy.py)."""

from fr_jax.decoding.core import (PADDING, ChunkedDecoder, DecodeResult, Decoder,  # noqa: F401
                                  decode_slots, left_pad)
from fr_jax.decoding.fused import FusedDecoder  # noqa: F401
from fr_jax.decoding.lazy import catch_up_widths  # noqa: F401
