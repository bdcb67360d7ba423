"""Token ids -> text as they stream in, cut at the request's stop strings.

A streamed answer must never show text it later takes back: the last characters that could
still be the start of a stop string are held back, and so is a trailing U+FFFD (the first
bytes of a character whose other bytes are in the next token). The text of the whole answer
is `decode(tokens)` up to the first stop string, as a non-streamed answer gives it.
"""

from __future__ import annotations

from typing import Callable, List, Sequence, Tuple

REPLACEMENT = "\ufffd"


class TextStream:
    """decode: token ids -> text (special tokens skipped); stops: the stop strings."""

    def __init__(self, decode: Callable[[List[int]], str], stops: Sequence[str] = ()):
        self.decode, self.stops = decode, tuple(stops)
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.ids: List[int] = []
        self.text = ""  # the decoded answer so far (up to a stop string once one is seen)
        self.sent = 0  # characters of `text` handed out
        self.stopped = False

    def feed(self, tokens: Sequence[int]) -> Tuple[str, int]:
        """Adds new tokens -> (text now safe to show, how many of `tokens` the answer keeps:
        all, or those up to the one that completed a stop string, which sets `stopped`)."""
        if self.stopped:
            return "", 0
        start = len(self.ids)
        self.ids += list(tokens)
        self.text = self.decode(self.ids)
        hit = self._first_stop(self.text)
        if hit >= 0:
            self.stopped = True
            keep = len(tokens)
            for k in range(1, len(tokens) + 1):  # the first token whose text holds the stop
                if self._first_stop(self.decode(self.ids[:start + k])) >= 0:
                    keep = k
                    break
            self.ids = self.ids[:start + keep]
            self.text = self.text[:hit]
            return self._take(len(self.text)), keep
        safe = len(self.text) - self.hold
        if self.text.endswith(REPLACEMENT):
            safe = min(safe, len(self.text.rstrip(REPLACEMENT)))
        return self._take(safe), len(tokens)

    def flush(self) -> str:
        """What was held back, at the end of the answer."""
        return self._take(len(self.text))

    def _first_stop(self, text: str) -> int:
        # a stop string can only begin in text not yet handed out (or straddle its edge)
        lo = max(0, self.sent - self.hold)
        hits = [i for i in (text.find(s, lo) for s in self.stops) if i >= 0]
        return min(hits, default=-1)

    def _take(self, upto: int) -> str:
        upto = max(upto, self.sent)
        out, self.sent = self.text[self.sent:upto], upto
        return out
