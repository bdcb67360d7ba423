"""Answer scorers by name: scorer(reference answer, model output) -> bool.

`exact` is the toy world's rule. The paper's benchmarks get their own scorers with the
evaluation harness.
"""

from __future__ import annotations

from typing import Callable, Dict


def exact_match(answer: str, output: str) -> bool:
    """Exact match after trimming surrounding whitespace."""
    return output.strip() == answer.strip()


SCORERS: Dict[str, Callable[[str, str], bool]] = {"exact": exact_match}


def get_scorer(name: str) -> Callable[[str, str], bool]:
    if name not in SCORERS:
        raise ValueError(f"unknown scorer {name!r}; choose one of {', '.join(sorted(SCORERS))}")
    return SCORERS[name]
