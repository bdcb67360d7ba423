"""Scorers: a model's output against a benchmark's reference -> a `Verdict`.

Where a maintained library does the job, it does it here:
  math       GSM8K and MATH-500 final answers: `math-verify` (Hugging Face) parses the gold
             answer and the output (\\boxed{} first, then the last LaTeX / plain expression)
             and compares them symbolically (0.5 == \\frac{1}{2}, sets, intervals, ...).
  humaneval  the generated function + the problem's `check(entry_point)`, executed in the
             sandbox (fr_jax.harness.sandbox); pass@1 with greedy decoding.
  mbpp       the generated code + the task's setup code and assert lines, in the sandbox.
  ifeval     Google's IFEval instruction checkers as packaged in `if-verifiable` (its IFEval
             registry); strict and loose, per instruction and per prompt. A checker that
             needs a resource this machine lacks (NLTK's punkt tokenizers, for
             length_constraints:number_sentences and change_case:capital_word_frequency)
             is reported as skipped with the reason, and its prompt is left out of the
             prompt-level score rather than counted as passed.
  exact      the embedded world's rule: exact match after trimming whitespace.

`SCORERS` (answer string, output) -> bool is the plain form that the sequence-level router
baseline labels its prompts with.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Dict, List, Optional

from fr_jax.harness.sandbox import Limits, run_python


@dataclasses.dataclass
class Verdict:
    """correct: None when the example could not be scored; details["skipped"] then lists
    [{"what": the part not checked, "reason": why}]."""

    correct: Optional[bool]
    details: dict = dataclasses.field(default_factory=dict)


# ---------------------------------------------------------------------------- exact
def exact_match(answer: str, output: str) -> bool:
    """Exact match after trimming surrounding whitespace."""
    return output.strip() == answer.strip()


def score_exact(reference: dict, output: str) -> Verdict:
    return Verdict(exact_match(reference["answer"], output))


# ---------------------------------------------------------------------------- math
def _gold(answer: str) -> str:
    """math-verify reads LaTeX between delimiters; a bare answer gets them."""
    answer = answer.strip()
    return answer if answer.startswith(("$", "\\(", "\\[", "\\boxed")) else f"${answer}$"


def math_equal(answer: str, output: str) -> bool:
    return score_math({"answer": answer}, output).correct


def score_math(reference: dict, output: str) -> Verdict:
    """math-verify: the output's final answer (\\boxed{} preferred) against the gold one.
    math-verify bounds its own parse/compare time with SIGALRM, so this runs in the main
    thread."""
    from math_verify import parse, verify

    gold = parse(_gold(reference["answer"]))
    if not gold:
        return Verdict(None, {"skipped": [{"what": "reference", "reason": (
            f"math-verify cannot parse the reference answer {reference['answer']!r}")}]})
    pred = parse(output)
    return Verdict(bool(pred) and bool(verify(gold, pred)),
                   {"extracted": str(pred[-1]) if pred else ""})


# ---------------------------------------------------------------------------- code
_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[ \t]*\n(.*?)(?:```|\Z)", re.S)


def extract_code(output: str) -> str:
    """The program in a model's answer: the first ```python (or untagged) fenced block,
    an unclosed block running to the end included; without a fence, the whole text."""
    blocks = [(lang.lower(), body) for lang, body in _FENCE.findall(output)]
    for lang, body in blocks:
        if lang in ("python", "py", "python3", ""):
            return body
    return blocks[0][1] if blocks else output


def humaneval_program(reference: dict, output: str) -> str:
    """The problem's prompt (imports, helper functions, the signature), then the generated
    code, then the tests. A reply with the whole function redefines the stub; a reply with
    only the body continues the prompt's signature."""
    code = extract_code(output)
    entry = reference["entry_point"]
    head = reference["prompt"]
    if not re.search(rf"^\s*def\s+{re.escape(entry)}\s*\(", code, re.M):
        return f"{head}{code}\n\n{reference['test']}\n\ncheck({entry})\n"
    return f"{head}\n{code}\n\n{reference['test']}\n\ncheck({entry})\n"


def mbpp_program(reference: dict, output: str) -> str:
    return "\n".join([reference.get("setup", ""), extract_code(output), "",
                      *reference["tests"], ""])


def _run_verdict(program: str, limits: Limits) -> Verdict:
    out = run_python(program, limits)
    return Verdict(out.passed, {"status": out.status, "reason": out.reason,
                                "seconds": round(out.seconds, 3)})


def score_humaneval(reference: dict, output: str, limits: Limits = Limits()) -> Verdict:
    return _run_verdict(humaneval_program(reference, output), limits)


def score_mbpp(reference: dict, output: str, limits: Limits = Limits()) -> Verdict:
    return _run_verdict(mbpp_program(reference, output), limits)


# ---------------------------------------------------------------------------- IFEval
def _registry():
    from if_verifiable.ifeval.instructions_registry import INSTRUCTION_DICT
    return INSTRUCTION_DICT


def _loose_variants(response: str) -> List[str]:
    from if_verifiable.common import get_loose_transformations
    return get_loose_transformations(response)


def score_ifeval(reference: dict, output: str) -> Verdict:
    """Every instruction of the prompt checked strictly (the response as it is) and loosely
    (first / last line or markdown asterisks removed), as IFEval defines them.
    correct = prompt-level strict; details: per-instruction results, skipped checkers."""
    registry = _registry()
    response = output.strip()
    variants = _loose_variants(response) if response else []
    results, skipped = [], []
    for iid, kwargs in zip(reference["instruction_id_list"], reference["kwargs"]):
        cls = registry.get(iid)
        if cls is None:
            skipped.append({"what": iid, "reason": "not in if-verifiable's IFEval registry"})
            continue
        checker = cls(iid)
        checker.build_description(**kwargs)
        if "prompt" in (checker.get_instruction_args() or {}):
            checker.build_description(prompt=reference["prompt"])
        try:
            strict = bool(response) and bool(checker.check_following(response))
            loose = any(v.strip() and checker.check_following(v) for v in variants)
        except LookupError as e:  # an NLTK data package that is not installed
            name = re.search(r"Resource\W+(\w+)", str(e))
            res = name.group(1) if name else "data"
            skipped.append({"what": iid, "reason": (
                f"needs NLTK's {res!r}, not installed here (python -m nltk.downloader "
                f"{res}, or set NLTK_DATA)")})
            continue
        results.append({"instruction": iid, "strict": strict, "loose": bool(loose)})
    details = {"instructions": results, "skipped": skipped}
    if skipped:
        return Verdict(None, details)
    details["loose"] = all(r["loose"] for r in results)
    return Verdict(all(r["strict"] for r in results), details)


# ---------------------------------------------------------------------------- registries
SCORERS: Dict[str, Callable[[str, str], bool]] = {"exact": exact_match, "math": math_equal}


def get_scorer(name: str) -> Callable[[str, str], bool]:
    if name not in SCORERS:
        raise ValueError(f"unknown scorer {name!r}; choose one of {', '.join(sorted(SCORERS))}")
    return SCORERS[name]


BENCHMARK_SCORERS = {"exact": score_exact, "math": score_math, "humaneval": score_humaneval,
                     "mbpp": score_mbpp, "ifeval": score_ifeval}
EXECUTES_CODE = ("humaneval", "mbpp")  # scorers that run a sandboxed process per example
