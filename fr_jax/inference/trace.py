"""Per-token routing traces for people: which expert produced each token.

Three renderings of the same thing: ANSI-coloured text for a terminal, a plain text form
(`[math]The answer[code] is`), and a small self-contained HTML page.
"""

from __future__ import annotations

import html
from collections import Counter
from typing import List, Optional, Sequence

from fr_jax.routing.fusion import ROUTER

# Distinct, readable on dark and light terminals (ANSI 256-colour codes) and in HTML.
_ANSI = (39, 208, 41, 199, 220, 135, 51, 196)
_HEX = ("#4e9ad8", "#f28e2b", "#59a14f", "#e15759", "#edc948", "#b07aa1", "#76b7b2", "#ff9da7")
_ROUTER_HEX = "#bab0ac"


def expert_label(chosen: int, names: Sequence[str]) -> str:
    return "router" if chosen == ROUTER else names[chosen] if 0 <= chosen < len(names) \
        else f"expert{chosen}"


def segments(pieces: Sequence[str], chosen: Sequence[int]):
    """Merges consecutive tokens of the same source: [(source, text), ...]."""
    out: List[List] = []
    for piece, c in zip(pieces, chosen):
        if out and out[-1][0] == c:
            out[-1][1] += piece
        else:
            out.append([c, piece])
    return [(c, t) for c, t in out]


def render_terminal(pieces, chosen, names) -> str:
    parts = []
    for c, text in segments(pieces, chosen):
        if c == ROUTER:
            parts.append(f"\033[1m{text}\033[0m")
        else:
            parts.append(f"\033[38;5;{_ANSI[c % len(_ANSI)]}m{text}\033[0m")
    return "".join(parts)


def render_text(pieces, chosen, names) -> str:
    return "".join(f"[{expert_label(c, names)}]{t}" for c, t in segments(pieces, chosen))


def legend_terminal(names) -> str:
    keys = [f"\033[38;5;{_ANSI[i % len(_ANSI)]}m■ {n}\033[0m" for i, n in enumerate(names)]
    return "  ".join(keys + ["\033[1m■ router\033[0m"])


def shares(chosen_rows: Sequence[Sequence[int]], names) -> dict:
    """Share of generated tokens per source (expert name or 'router')."""
    counts = Counter(c for row in chosen_rows for c in row)
    total = sum(counts.values()) or 1
    return {expert_label(c, names): counts[c] / total for c in sorted(counts)}


def summary(chosen_rows, names, n_tokens: int, seconds: float) -> str:
    share = " | ".join(f"{k} {v:.0%}" for k, v in shares(chosen_rows, names).items())
    rate = n_tokens / seconds if seconds > 0 else float("inf")
    return (f"tokens per expert: {share} — {n_tokens} tokens in {seconds:.2f} s "
            f"({rate:.1f} tok/s, wall time incl. compilation)")


def render_html(rows, names, title: str = "fr_jax routing trace",
                mode: Optional[str] = None) -> str:
    """rows: [{"prompt": str, "pieces": [str], "chosen": [int], "probs": [[float]]}]."""
    colour = lambda c: _ROUTER_HEX if c == ROUTER else _HEX[c % len(_HEX)]
    legend = "".join(
        f'<span class="tok" style="background:{colour(i)}">{html.escape(n)}</span>'
        for i, n in [*enumerate(names), (ROUTER, "router")])
    blocks = []
    for r in rows:
        toks = []
        for k, (piece, c) in enumerate(zip(r["pieces"], r["chosen"])):
            probs = r.get("probs")
            tip = expert_label(c, names)
            if probs:
                tip += " | w = " + ", ".join(f"{n}:{p:.2f}" for n, p in zip(names, probs[k]))
            toks.append(f'<span class="tok" style="background:{colour(c)}" '
                        f'title="{html.escape(tip)}">{html.escape(piece)}</span>')
        blocks.append(f'<div class="row"><div class="prompt">{html.escape(r["prompt"])}</div>'
                      f'<div class="answer">{"".join(toks)}</div></div>')
    sub = f" — mode {html.escape(mode)}" if mode else ""
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; max-width: 60em; }}
.tok {{ border-radius: 3px; padding: 0 1px; white-space: pre-wrap; color: #111; }}
.legend .tok {{ margin-right: .6em; padding: 0 .4em; }}
.row {{ margin: 1.2em 0; }}
.prompt {{ color: #555; font-style: italic; margin-bottom: .3em; white-space: pre-wrap; }}
.answer {{ font-family: ui-monospace, monospace; line-height: 1.7; }}
</style></head><body>
<h2>{html.escape(title)}{sub}</h2>
<div class="legend">{legend}</div>
{"".join(blocks)}
</body></html>
"""
