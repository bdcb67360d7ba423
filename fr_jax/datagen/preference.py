"""CDPO preference pairs from the stage-1 router's own answers (method.md, stage 2).

For every training prompt of every source, FusionRoute (router + experts, the project's
sampler, batched, the lineup's lazy experts) answers `greedy` + `samples` times; each
answer is scored by the benchmark's own scorer (fr_jax.harness.scoring: math-verify against
the gold answer, the sandbox against the tests, the IFEval checkers, exact match for the
toy world). A prompt with at least one incorrect answer gives one pair:

    chosen    the first correct answer (greedy first, then the samples in order); with
              chosen="reference", or when no answer is correct, the record's reference
              solution (Example.solution); no reference either: no pair
    rejected  the incorrect answer the policy produced most often (ties: the first)

Unscored answers (a checker that cannot run here) count neither way; an empty answer is
never a rejected one (it would carry no tokens to learn from).

Every draw is one run of the eval harness's generation and scoring steps with its own
cache folder (<workdir>/<source>/<draw>/..., draws `greedy`, `sample_0`, ...): a killed run resumes batch by batch, and
a changed checkpoint, prompt or sampling setting is decoded anew.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
from typing import Dict, List, Optional, Sequence, Tuple

from fr_jax.config import CHOICES
from fr_jax.harness import runner as harness
from fr_jax.harness.benchmarks import Example
from fr_jax.harness.sandbox import Limits
from fr_jax.inference.lineup import Lineup
from fr_jax.inference.sampling import Sampling
from fr_jax.runtime.paths import write_atomic

MODE = "fusionroute"


@dataclasses.dataclass(frozen=True)
class Source:
    """The training prompts of one source: examples of benchmark kind `benchmark` (its
    converter, prompt template and scorer), and the domain its pairs are counted under
    ("" = each example's group)."""

    name: str
    benchmark: str
    examples: Sequence[Example]
    domain: str = ""


@dataclasses.dataclass
class PairSettings:
    """How answers are drawn and pairs chosen; `max_new_tokens` per benchmark kind."""

    max_new_tokens: Dict[str, int]
    samples: int = 4  # sampled answers per prompt
    greedy: bool = True  # and the greedy one
    sampling: Sampling = Sampling(temperature=1.0)
    chosen: str = "sampled"  # sampled | reference
    workdir: Optional[str] = None  # None: nothing cached (no resume)
    batch_size: int = 16
    chunk: int = 8
    chat: bool = True
    seed: int = 0
    limits: Limits = Limits()
    workers: int = 2
    progress: bool = True

    def draws(self) -> List[Tuple[str, Sampling, int]]:
        """(name, sampling, seed) of each answer drawn per prompt, in the order the chosen
        answer is looked for."""
        out = [("greedy", Sampling(), self.seed)] if self.greedy else []
        return out + [(f"sample_{k}", self.sampling, self.seed + 1000 * (k + 1))
                      for k in range(self.samples)]


def _harness_settings(ps: PairSettings, workdir: Optional[str], sampling: Sampling,
                      seed: int) -> harness.Settings:
    return harness.Settings(max_new_tokens=dict(ps.max_new_tokens), workdir=workdir,
                            batch_size=ps.batch_size, chunk=ps.chunk, chat=ps.chat,
                            sampling=sampling, seed=seed, limits=ps.limits,
                            workers=ps.workers, progress=ps.progress)


def scored_answers(lineup: Lineup, source: Source, ps: PairSettings,
                   fingerprint: str = "") -> List[List[Tuple[str, Optional[bool]]]]:
    """[draw][example] -> (answer text, correct or None when unscored)."""
    fingerprint = fingerprint or harness.lineup_fingerprint(lineup)
    out, runners = [], {}  # the sampled draws share one compiled decoder
    for name, sampling, seed in ps.draws():
        where = os.path.join(ps.workdir, source.name, name) if ps.workdir else None
        s = _harness_settings(ps, where, sampling, seed)
        gens = harness.cached_generations(lineup, source.benchmark, MODE, source.examples, s,
                                          fingerprint, runners)
        verdicts = harness.score(source.benchmark, MODE, source.examples, gens, s)
        out.append([(g["text"], v["correct"]) for g, v in zip(gens, verdicts)])
    return out


def choose_pair(answers: Sequence[Tuple[str, Optional[bool]]], reference: str,
                chosen: str = "sampled") -> Tuple[Optional[dict], str]:
    """(the pair {"chosen", "rejected", "chosen_from"} or None, what happened): one
    prompt's scored answers (in draw order) -> the pair it gives, if any."""
    texts = [(t.strip(), c) for t, c in answers]
    wrong = collections.Counter(t for t, c in texts if c is False and t)
    right = [t for t, c in texts if c is True and t]
    if not wrong:
        return None, "all_correct" if right else "no_incorrect_answer"
    if right and chosen == "sampled":
        best, source = right[0], "sample"
    elif reference.strip():
        best, source = reference.strip(), "reference"
    else:
        return None, "no_correct_answer"
    return {"chosen": best, "rejected": wrong.most_common(1)[0][0], "chosen_from": source}, \
        "pair"


def build_pairs(lineup: Lineup, sources: Sequence[Source], ps: PairSettings
                ) -> Tuple[List[dict], dict]:
    """Every source's prompts -> (pair rows {"prompt", "chosen", "rejected", "domain",
    "source", "id"}, statistics per domain and per source)."""
    if ps.chosen not in CHOICES["pairs.chosen"]:
        raise ValueError(f"chosen must be one of {CHOICES['pairs.chosen']}, got {ps.chosen!r}")
    if not ps.draws():
        raise ValueError("no answers to draw: set samples > 0 or greedy")
    fingerprint = harness.lineup_fingerprint(lineup)
    rows: List[dict] = []
    per_domain: Dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    per_source: Dict[str, collections.Counter] = {}
    for src in sources:
        answers = scored_answers(lineup, src, ps, fingerprint)
        counts = per_source.setdefault(src.name, collections.Counter())
        for j, ex in enumerate(src.examples):
            mine = [draw[j] for draw in answers]
            pair, what = choose_pair(mine, ex.solution, ps.chosen)
            domain = src.domain or ex.group or src.name
            for c in (counts, per_domain[domain]):
                c["prompts"] += 1
                c["answers"] += len(mine)
                c["correct"] += sum(v is True for _, v in mine)
                c["unscored"] += sum(v is None for _, v in mine)
                c[what] += 1
                if pair:
                    c["chosen_from_" + pair["chosen_from"]] += 1
            if pair:
                rows.append({"prompt": ex.prompt, "chosen": pair["chosen"],
                             "rejected": pair["rejected"], "domain": domain,
                             "source": src.name, "id": ex.id})
    stats = {"draws": [d[0] for d in ps.draws()], "chosen": ps.chosen,
             "temperature": ps.sampling.temperature,
             "domains": {d: _summary(c) for d, c in sorted(per_domain.items())},
             "sources": {s: _summary(c) for s, c in per_source.items()}}
    stats["total"] = _summary(sum(per_domain.values(), collections.Counter()))
    return rows, stats


def _summary(c: collections.Counter) -> dict:
    scored = c["answers"] - c["unscored"]
    return {"prompts": c["prompts"], "pairs": c["pair"],
            "answer_accuracy": round(c["correct"] / scored, 4) if scored else None,
            "all_correct": c["all_correct"], "no_correct_answer": c["no_correct_answer"],
            "no_incorrect_answer": c["no_incorrect_answer"],
            "chosen_from_sample": c["chosen_from_sample"],
            "chosen_from_reference": c["chosen_from_reference"],
            "unscored_answers": c["unscored"]}


def table(stats: dict) -> str:
    """The statistics as a markdown table, one row per domain and the total."""
    head = ("| domain | prompts | pairs | answer accuracy | all correct | no correct answer "
            "| chosen: sample / reference |")
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|"]
    for name, s in list(stats["domains"].items()) + [("total", stats["total"])]:
        acc = "-" if s["answer_accuracy"] is None else f"{100 * s['answer_accuracy']:.1f}%"
        lines.append(f"| {name} | {s['prompts']} | {s['pairs']} | {acc} | {s['all_correct']} "
                     f"| {s['no_correct_answer']} | {s['chosen_from_sample']} / "
                     f"{s['chosen_from_reference']} |")
    return "\n".join(lines)



def stats_path(path: str) -> str:
    """Where `write_pairs` puts the statistics of the pairs at `path`."""
    return os.path.splitext(path)[0] + ".stats.json"


def write_pairs(path: str, rows: Sequence[dict], stats: dict) -> Tuple[str, str]:
    """The pairs as JSONL at `path` and the statistics at <path stem>.stats.json, each
    written to a temporary file and renamed (a kill never leaves half a file); returns
    both paths."""
    for target, text in ((path, "".join(json.dumps(r) + "\n" for r in rows)),
                         (stats_path(path), json.dumps(stats, indent=1))):
        write_atomic(target, text)
    return path, stats_path(path)
