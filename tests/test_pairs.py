"""The CDPO preference-pair engine (fr_jax.datagen.preference, `python -m fr_jax.data.pairs`):
the pair rule on hand-made answers, the engine on the bundled toy world (every chosen answer
scores correct and every rejected one incorrect under the benchmark's own scorer), resume
by batch, and the command line end to end."""

import json
import os
import subprocess
import sys

import pytest

from cli_env import REPO, one_device_env
from fr_jax.datagen.preference import PairSettings, Source, build_pairs, choose_pair
from fr_jax.harness import runner as harness
from fr_jax.harness import toy_world as W
from fr_jax.harness.benchmarks import toy_examples
from fr_jax.harness.scoring import exact_match
from fr_jax.inference.sampling import Sampling


def test_the_pair_rule():
    right, wrong = ("4", True), ("5", False)
    assert choose_pair([right, right], "4") == (None, "all_correct")
    # Greedy first, then the samples: the first correct answer is chosen; the incorrect
    # answer produced most often is rejected.
    pair, what = choose_pair([("6", False), (" 4 ", True), wrong, wrong, ("four", True)], "4")
    assert what == "pair" and pair == {"chosen": "4", "rejected": "5", "chosen_from": "sample"}
    # No correct answer: the reference; none either: no pair.
    assert choose_pair([wrong], "the answer is 4")[0]["chosen"] == "the answer is 4"
    assert choose_pair([wrong], "  ") == (None, "no_correct_answer")
    # chosen="reference" always takes the reference.
    assert choose_pair([right, wrong], "ref", "reference")[0]["chosen_from"] == "reference"
    # Unscored answers count neither way; an empty answer is never the rejected one.
    assert choose_pair([("x", None), ("", False)], "4") == (None, "no_incorrect_answer")
    assert choose_pair([("", False), ("", False), wrong], "4")[0]["rejected"] == "5"


@pytest.fixture(scope="module")
def world():
    from fr_jax.runtime.bundle import bundled_world
    from fr_jax.toy import pipeline as demo

    w = bundled_world()
    lineup = demo.load_world_lineup(w["router"], w["experts"])
    data = W.make_world_data(200, 20, seed=5)
    # The mixed domain is where the bundled router still errs: pairs are found there.
    tasks = data.train["mixed"][:16] + data.train["math"][:8]
    return lineup, [Source("toy", "toy", toy_examples(tasks))]


def _settings(workdir, **kw):
    return PairSettings(max_new_tokens={"toy": 16}, samples=2,
                        sampling=Sampling(temperature=1.0), workdir=str(workdir),
                        batch_size=8, progress=False, **kw)


class _Counting:
    """harness.ModeRunner, counting the rows it decodes."""

    rows = 0

    def __init__(self, real):
        self.real = real

    def __call__(self, *args, **kwargs):
        runner = self.real(*args, **kwargs)
        inner = runner.run

        def run(ids, seed=0):
            _Counting.rows += len(ids)
            return inner(ids, seed)

        runner.run = run
        return runner


def test_pairs_from_the_toy_world_score_as_they_claim_and_resume_by_batch(world, tmp_path,
                                                                          monkeypatch):
    lineup, sources = world
    examples = {e.id: e for e in sources[0].examples}
    rows, stats = build_pairs(lineup, sources, _settings(tmp_path))
    assert rows, stats
    for r in rows:  # the benchmark's own scorer agrees with every pair
        answer = examples[r["id"]].reference["answer"]
        assert exact_match(answer, r["chosen"]), r
        assert not exact_match(answer, r["rejected"]), r
        assert r["prompt"] == examples[r["id"]].prompt and r["source"] == "toy"
    total = stats["total"]
    assert total["prompts"] == 24 and total["pairs"] == len(rows)
    assert total["pairs"] + total["all_correct"] + total["no_correct_answer"] + \
        total["no_incorrect_answer"] == 24
    assert total["chosen_from_sample"] + total["chosen_from_reference"] == len(rows)
    assert set(stats["domains"]) <= {"mixed", "math"} and stats["draws"] == [
        "greedy", "sample_0", "sample_1"]
    assert sum(d["pairs"] for d in stats["domains"].values()) == len(rows)

    # A rerun decodes nothing; with one draw's last batch lost (a kill mid-run), only that
    # batch is decoded again, and the pairs are the same.
    monkeypatch.setattr(harness, "ModeRunner", _Counting(harness.ModeRunner))
    _Counting.rows = 0
    assert build_pairs(lineup, sources, _settings(tmp_path)) == (rows, stats)
    assert _Counting.rows == 0
    cache = tmp_path / "toy" / "sample_1" / "generations" / "toy" / "fusionroute.jsonl"
    lines = cache.read_text().splitlines(keepends=True)
    cache.write_text("".join(lines[:16]) + lines[16][:20])  # the last line cut short
    assert build_pairs(lineup, sources, _settings(tmp_path)) == (rows, stats)
    assert _Counting.rows == 8

    # chosen="reference": the same prompts give pairs, all with the reference answer.
    ref_rows, ref_stats = build_pairs(lineup, sources, _settings(tmp_path, chosen="reference"))
    assert [r["id"] for r in ref_rows] == [r["id"] for r in rows]
    assert all(r["chosen"] == examples[r["id"]].solution for r in ref_rows)
    assert ref_stats["total"]["chosen_from_reference"] == len(rows)


def _pairs_cli(tmp_path, *args):
    return subprocess.run([sys.executable, "-m", "fr_jax.data.pairs", *args], cwd=REPO,
                          env=one_device_env(tmp_path / "home"), capture_output=True,
                          text=True, timeout=600)


@pytest.mark.slow
def test_pairs_cli_writes_pairs_that_stage_cdpo_reads(tmp_path):
    pool = tmp_path / "pool.jsonl"
    data = W.make_world_data(200, 20, seed=6)
    W.write_jsonl(str(pool), [t.record() for t in data.train["mixed"][:12]])
    out = tmp_path / "out" / "pref.jsonl"
    res = _pairs_cli(tmp_path, f"--config.pairs.sources.toy.path={pool}", "--samples=1",
                     f"--output={out}", f"--workdir={tmp_path / 'work'}",
                     "--config.eval.progress=False", "--config.pairs.batch_size=6")
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    stats = json.loads((tmp_path / "out" / "pref.stats.json").read_text())
    assert stats["total"]["prompts"] == 12 and stats["total"]["pairs"] == len(rows)
    assert f"wrote {len(rows)} pairs to {out}" in res.stdout and "| mixed | 12 |" in res.stdout
    from fr_jax.corpus import tokenize_pref
    from fr_jax.harness.toy_world import build_tokenizer

    examples, report = tokenize_pref(rows, build_tokenizer(), seq_len=64)
    assert report.kept == len(rows)


def test_pairs_cli_refuses_a_source_without_training_prompts(tmp_path):
    # A benchmark's default data is its test split: the engine never falls back to it.
    res = _pairs_cli(tmp_path, "--config.pairs.sources.toy.benchmark=gsm8k",
                     f"--output={tmp_path / 'p.jsonl'}")
    assert res.returncode != 0
    assert res.stderr.strip().splitlines()[-1] == (
        "error: pairs.sources.toy: no training prompts configured; set "
        "--config.pairs.sources.toy.path=<file> (training records in gsm8k's format: "
        "question, answer) or .hub=<owner/name:subset:split>")
    assert not os.path.exists(tmp_path / "p.jsonl")
