"""The evaluation harness: loaders on upstream-format files, scorers with known verdicts,
resume after a kill, and the CLI end to end on the bundled tiny checkpoints."""

import json
import os
import subprocess
import sys

import pytest

from fr_jax.corpus import DataError
from fr_jax.harness import benchmarks as B
from fr_jax.harness import prompts as P
from fr_jax.harness import scoring as S
from fr_jax.harness.sandbox import Limits
from fr_jax.runtime.bundle import bundled_world

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fixtures as F  # noqa: E402
from cli_env import REPO, one_device_env  # noqa: E402

FAST = Limits(timeout_s=3.0, memory_mb=512)


# ------------------------------------------------------------------------------ loaders
def test_loaders_read_the_upstream_formats(tmp_path):
    paths = F.write_all(tmp_path)
    gsm = B.load_examples("gsm8k", paths["gsm8k"])
    assert [e.reference["answer"] for e in gsm] == ["72", "2400", "3"]
    assert gsm[0].prompt == P.gsm8k(F.GSM8K[0]["question"])
    assert gsm[0].prompt.endswith(P.MATH_INSTRUCTION)

    m5 = B.load_examples("math500", paths["math500"])
    assert [e.id for e in m5] == [r["unique_id"] for r in F.MATH500]
    assert [e.group for e in m5] == ["Prealgebra", "Algebra", "Algebra"]
    assert m5[1].reference == {"answer": "2\\sqrt{2}"}

    mb = B.load_examples("mbpp", paths["mbpp"])
    assert [e.id for e in mb] == ["11", "17"] and mb[1].reference["setup"] == "import math"
    assert F.MBPP[0]["test_list"][0] in mb[0].prompt and F.MBPP[0]["text"] in mb[0].prompt

    ife = B.load_examples("ifeval", paths["ifeval"])
    assert ife[0].prompt == F.IFEVAL[0]["prompt"]
    assert ife[0].reference["kwargs"] == [{}, {"num_words": 8, "relation": "at least"}]

    # The same records as Parquet and as a saved datasets folder.
    import datasets
    ds = datasets.Dataset.from_list(F.GSM8K)
    ds.to_parquet(str(tmp_path / "gsm.parquet"))
    ds.save_to_disk(str(tmp_path / "gsm_saved"))
    for p in (tmp_path / "gsm.parquet", tmp_path / "gsm_saved"):
        assert B.load_examples("gsm8k", str(p)) == gsm

    # The toy world's tasks, in the record format the demo writes.
    toy = F.write_jsonl(tmp_path / "toy.jsonl", [
        {"domain": "math", "prompt": "add 1+2", "response": "3"},
        {"domain": "mixed", "prompt": "wrap add 1+2", "response": "[3]"}])
    assert [(e.group, e.reference["answer"]) for e in B.load_examples("toy", toy)] == [
        ("math", "3"), ("mixed", "[3]")]


def test_humaneval_loader_reads_the_packaged_problems():
    ex = B.load_examples("humaneval")
    assert len(ex) == 164
    assert ex[0].id == "HumanEval/0" and ex[-1].id == "HumanEval/163"
    assert ex[0].reference["entry_point"] == "has_close_elements"
    assert "def has_close_elements" in ex[0].prompt and ex[0].prompt.endswith("```")


def test_loader_errors_name_the_problem_and_the_fix(tmp_path):
    with pytest.raises(DataError, match=r"gsm8k: no data at .*nope\.jsonl.*question, answer"):
        B.load_examples("gsm8k", str(tmp_path / "nope.jsonl"))
    with pytest.raises(DataError, match=r"math500: no data configured.*eval\.data\.math500\.path"):
        B.load_examples("math500")
    bad = F.write_jsonl(tmp_path / "bad.jsonl", [{"question": "q?"}])
    with pytest.raises(DataError, match=r"bad\.jsonl record 0: record has no answer field"):
        B.load_examples("gsm8k", bad)
    with pytest.raises(DataError, match="unknown benchmark 'gsm9k'"):
        B.load_examples("gsm9k")


def test_subsets_are_deterministic_and_keep_file_order():
    ex = B.load_examples("humaneval")
    a, b = B.select(ex, 10, seed=3), B.select(ex, 10, seed=3)
    assert a == b and len(a) == 10
    order = [ex.index(e) for e in a]
    assert order == sorted(order)
    assert B.select(ex, 10, seed=4) != a and B.select(ex, 0) == ex


# ------------------------------------------------------------------------------ scorers
@pytest.mark.parametrize("gold,output", [
    ("72", "48 + 24 = 72, so the answer is \\boxed{72}."),
    ("2400", "She sells \\boxed{2,400} pens."),
    ("\\frac{1}{2}", "The sum is $0.5$."),
    ("\\frac{1}{2}", "So we get \\boxed{\\dfrac{1}{2}}"),
    ("2\\sqrt{2}", "\\boxed{\\sqrt{8}}"),
    ("3", "Therefore $x = \\boxed{3}$"),
])
def test_math_scorer_accepts_equivalent_answers(gold, output):
    assert S.score_math({"answer": gold}, output).correct is True


@pytest.mark.parametrize("gold,output", [
    ("72", "The answer is \\boxed{73}."),
    ("\\frac{1}{2}", "\\boxed{\\frac{1}{3}}"),
    ("3", "I am not sure."),
    ("2\\sqrt{2}", "\\boxed{2\\sqrt{3}}"),
])
def test_math_scorer_rejects_wrong_answers(gold, output):
    assert S.score_math({"answer": gold}, output).correct is False


def test_code_extraction():
    assert S.extract_code("Sure:\n```python\ndef f():\n    return 1\n```\nDone") == \
        "def f():\n    return 1\n"
    assert S.extract_code("```\nx = 1\n```") == "x = 1\n"
    assert S.extract_code("```python\nx = 2\n") == "x = 2\n"  # cut off by max-new-tokens
    assert S.extract_code("x = 3") == "x = 3"


HUMANEVAL_0 = B.load_examples("humaneval")[0]
GOOD_0 = ("```python\nfrom typing import List\n\ndef has_close_elements(numbers: List[float], "
          "threshold: float) -> bool:\n    return any(abs(a - b) < threshold for i, a in "
          "enumerate(numbers) for b in numbers[i + 1:])\n```")


@pytest.mark.parametrize("output,status,reason", [
    (GOOD_0, "passed", ""),
    # Only the body, continuing the prompt's signature.
    ("    for i, a in enumerate(numbers):\n        for b in numbers[i + 1:]:\n"
     "            if abs(a - b) < threshold:\n                return True\n    return False\n",
     "passed", ""),
    ("```python\ndef has_close_elements(numbers, threshold):\n    return False\n```", "failed",
     "AssertionError"),
    ("```python\ndef has_close_elements(numbers, threshold):\n    raise KeyError('x')\n```",
     "failed", "KeyError"),
    ("```python\ndef has_close_elements(numbers, threshold):\n    while True:\n        pass\n```",
     "timeout", ""),
    ("```python\ndef has_close_elements(numbers, threshold)\n    return 1\n```", "failed",
     "SyntaxError"),
])
def test_humaneval_scorer_runs_the_tests_in_the_sandbox(output, status, reason):
    v = S.score_humaneval(HUMANEVAL_0.reference, output, FAST)
    assert v.details["status"] == status, v.details
    assert v.correct is (status == "passed")
    assert reason in v.details["reason"]


def test_mbpp_scorer(tmp_path):
    ex = B.load_examples("mbpp", F.write_all(tmp_path)["mbpp"])
    good = f"```python\n{F.MBPP[0]['code']}\n```"
    assert S.score_mbpp(ex[0].reference, good, FAST).correct is True
    bad = "```python\ndef remove_Occ(s, ch):\n    return s[1:-1]\n```"
    v = S.score_mbpp(ex[0].reference, bad, FAST)
    assert v.correct is False and "AssertionError" in v.details["reason"]
    # The setup code runs first: `math` is there for the solution.
    uses_setup = "```python\ndef square_perimeter(a):\n    return int(math.fsum([a] * 4))\n```"
    assert S.score_mbpp(ex[1].reference, uses_setup, FAST).correct is True


def _ifeval(tmp_path):
    return {e.id: e for e in B.load_examples("ifeval", F.write_all(tmp_path)["ifeval"])}


def test_ifeval_scorer_follows_and_violates(tmp_path):
    ex = _ifeval(tmp_path)
    ok = S.score_ifeval(ex["1000"].reference, "Rivers carry water from the hills down to the sea.")
    assert ok.correct is True and ok.details["loose"] is True
    comma = S.score_ifeval(ex["1000"].reference, "Rivers, lakes and seas are wet and wide and deep.")
    assert comma.correct is False
    assert [r["strict"] for r in comma.details["instructions"]] == [False, True]
    short = S.score_ifeval(ex["1000"].reference, "Rivers flow.")
    assert short.correct is False
    assert S.score_ifeval(ex["1001"].reference, "the sky is clear and blue today").correct is True
    assert S.score_ifeval(ex["1001"].reference, "The Sky Is Clear And Blue Today").correct is False
    # Loose: a first line of chatter is forgiven, strict is not.
    chatter = S.score_ifeval(ex["1001"].reference, "Sure! Here It Is:\nthe sky is grey and calm")
    assert chatter.correct is False and chatter.details["loose"] is True
    assert S.score_ifeval(ex["1000"].reference, "").correct is False


def test_ifeval_checker_without_its_resource_is_skipped_not_passed(tmp_path):
    """number_sentences needs NLTK's punkt tokenizer data, which no package installs
    offline: the instruction is reported as skipped and the prompt left unscored."""
    import nltk

    ex = _ifeval(tmp_path)
    v = S.score_ifeval(ex["1002"].reference, "A cat purrs. Any other questions?")
    try:
        nltk.data.find("tokenizers/punkt_tab/english/")
        have_punkt = True
    except LookupError:
        have_punkt = False
    if have_punkt:  # a machine with NLTK data: the checker runs for real
        assert v.correct is True
    else:
        assert v.correct is None
        (sk,) = v.details["skipped"]
        assert sk["what"] == "length_constraints:number_sentences"
        assert "punkt" in sk["reason"] and "nltk.downloader" in sk["reason"]
        # The other instruction of the prompt was still checked.
        assert v.details["instructions"] == [
            {"instruction": "startend:end_checker", "strict": True, "loose": True}]
    unknown = S.score_ifeval({"prompt": "p", "instruction_id_list": ["made:up"],
                              "kwargs": [{}]}, "text")
    assert unknown.correct is None and "registry" in unknown.details["skipped"][0]["reason"]


# ------------------------------------------------------------------------------ the harness


def _cli(tmp_path, *args, **kw):
    return subprocess.Popen([sys.executable, "-m", "fr_jax.eval", "--config=configs/tiny.py",
                             *args], cwd=REPO, env=one_device_env(tmp_path / "home"),
                            stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kw)


@pytest.mark.slow
def test_end_to_end_two_modes_on_every_benchmark(tmp_path):
    """The CLI on the bundled tiny checkpoints over fixture data of every benchmark: the
    table, the JSON and the plot, routing shares per benchmark, code run in the sandbox."""
    paths = F.write_all(tmp_path / "data")
    out_dir = tmp_path / "run"
    benches = ["gsm8k", "math500", "mbpp", "humaneval", "ifeval", "toy"]
    args = [f"--benchmarks={','.join(benches)}", "--modes=fusionroute,expert:0", "--limit=2",
            f"--workdir={out_dir}", "--config.eval.batch_size=2",
            "--config.eval.sandbox.timeout_s=5"]
    args += [f"--config.eval.data.{b}.path={p}" for b, p in paths.items()]
    args += [f"--config.eval.max_new_tokens.{b}=8" for b in benches]
    proc = _cli(tmp_path, *args)
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out[-3000:]
    res = json.load(open(out_dir / "results.json"))
    assert res["domains"] == benches and res["modes"] == ["fusionroute", "expert:0"]
    for mode in res["modes"]:
        assert set(res["accuracy"][mode]) == set(benches)
        assert all(v is None or 0 <= v <= 1 for v in res["accuracy"][mode].values())
    assert res["n"] == {b: 2 for b in benches}
    for b in benches:  # routing statistics per benchmark: shares over the experts sum to 1
        shares = res["shares"]["fusionroute"][b]
        assert set(shares) == {"math", "code", "instr", "router"}
        assert abs(sum(shares.values()) - 1) < 1e-3
    assert res["shares"]["expert:0"]["gsm8k"]["math"] == 1.0
    md = open(out_dir / "results.md").read()
    assert "| FusionRoute (`fusionroute`) |" in md and "| GSM8K | MATH-500 | MBPP |" in md
    assert "Share of FusionRoute's generated tokens" in md
    assert open(out_dir / "results.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert "| FusionRoute (`fusionroute`) |" in out  # the table is printed too
    # Every generated program went through the sandbox and got a verdict with its status.
    for b in ("humaneval", "mbpp"):
        lines = open(out_dir / "scores" / b / "fusionroute.jsonl").read().splitlines()
        assert len(lines) == 2
        for rec in map(json.loads, lines):
            assert rec["details"]["status"] in ("passed", "failed", "timeout", "memory",
                                                "output_limit", "killed")


@pytest.mark.slow
def test_a_killed_run_resumes_without_redoing_cached_samples(tmp_path):
    """A run is SIGKILLed once its first batches are on disk; the rerun decodes only what
    is missing and its table equals an uninterrupted run's."""
    import signal
    import time

    common = ["--benchmarks=toy", "--modes=expert_only,expert:1", "--limit=48",
              "--config.eval.batch_size=4", "--config.eval.max_new_tokens.toy=12",
              "--config.eval.columns=groups"]
    ref = _cli(tmp_path, *common, f"--workdir={tmp_path / 'ref'}")
    out, _ = ref.communicate(timeout=900)
    assert ref.returncode == 0, out[-3000:]

    run = tmp_path / "run"
    gen = run / "generations" / "toy" / "expert_only.jsonl"
    proc = _cli(tmp_path, *common, f"--workdir={run}")
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if gen.exists() and len(gen.read_text().splitlines()) >= 4:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL  # killed midway, not finished
    done = len([ln for ln in gen.read_text().split("\n") if ln.strip()])
    assert 4 <= done < 48

    again = _cli(tmp_path, *common, f"--workdir={run}")
    out, _ = again.communicate(timeout=900)
    assert again.returncode == 0, out[-3000:]
    cached = int(out.split("[eval] toy expert_only: ")[1].split(" cached")[0])
    assert cached >= done - 1  # at most a line cut short by the kill is redone
    assert f"{cached} cached, {48 - cached} to decode" in out
    lines = [json.loads(ln) for ln in gen.read_text().splitlines()]
    assert len(lines) == 48 and len({r["id"] for r in lines}) == 48  # none decoded twice
    a, b = (json.load(open(p / "results.json")) for p in (tmp_path / "ref", run))
    for k in ("accuracy", "average", "shares", "scored"):
        assert a[k] == b[k], k
    assert a["domains"] == ["math", "code", "instr", "mixed"]
    assert open(run / "results.md").read() == open(tmp_path / "ref" / "results.md").read()


def test_hub_names_fail_clearly_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError, match=r"cannot load 'openai/gsm8k:main:test' from the hub"
                                        r".*set a local path instead"):
        B.load_examples("gsm8k", hub="openai/gsm8k:main:test")


def test_cli_errors_are_one_line(tmp_path):
    proc = _cli(tmp_path, "--benchmarks=gsm8k", "--modes=fusionroute",
                f"--config.eval.data.gsm8k.path={tmp_path / 'missing.jsonl'}")
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0
    assert "error: gsm8k: no data at" in out and "Traceback" not in out
    proc = _cli(tmp_path, "--benchmarks=toy", "--modes=fusionroot")
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0 and "unknown decode mode 'fusionroot'" in out
    assert "Traceback" not in out


@pytest.mark.slow
def test_harness_on_a_mesh_decodes_what_a_single_device_does(tmp_path):
    """The CLI's lineup is placed on the 8-device test mesh (batches sharded over `data`);
    its greedy tokens equal the harness's on one device with the same checkpoints."""
    import jax

    from fr_jax.harness import runner as harness
    from fr_jax.eval import main
    from fr_jax.toy import pipeline as demo

    assert jax.device_count() == 8
    modes = ["fusionroute", "finetuned"]
    main(["--benchmarks=toy", f"--modes={','.join(modes)}", "--limit=16",
          f"--workdir={tmp_path / 'mesh'}", "--config.eval.batch_size=8",
          "--config.eval.progress=False", "--config.mesh.data=8", "--config.mesh.tensor=1"])
    world = bundled_world()
    lineup = demo.load_world_lineup(world["router"], world["experts"],
                              {"finetuned": world["finetuned"]})
    examples = {"toy": B.select(B.load_examples("toy"), 16)}
    s = harness.Settings(max_new_tokens={"toy": 16}, workdir=str(tmp_path / "one"),
                         batch_size=8, progress=False)
    harness.evaluate(lineup, examples, modes, s)
    for mode in modes:
        a, b = ([json.loads(x) for x in open(tmp_path / d / "generations" / "toy" /
                                              f"{mode}.jsonl")] for d in ("mesh", "one"))
        assert [r["tokens"] for r in a] == [r["tokens"] for r in b], mode
        assert [r["experts"] for r in a] == [r["experts"] for r in b], mode


def test_hostile_programs_fail_their_samples_and_the_harness_keeps_going(tmp_path):
    """Generated 'solutions' that attack the machine, scored through the harness like any
    MBPP answer (several at once): each is a failed sample with its cause recorded, the
    side effects did not happen, and the honest answer after them still passes."""
    from fr_jax.harness import runner as harness

    sentinel = tmp_path / "keep.txt"
    sentinel.write_text("x")
    outside = tmp_path / "written.txt"
    hostile = {
        "write": f"open({str(outside)!r}, 'w').write('pwned')",
        "delete": f"import os\nos.remove({str(sentinel)!r})",
        "socket": "import socket\nsocket.create_connection(('127.0.0.1', 22), timeout=1)",
        "fork": "import os\nwhile True:\n    os.fork()",
        "memory": "x = bytearray(4 << 30)",
        "print": "while True:\n    print('y' * 65536)",
        "loop": "while True:\n    pass",
    }
    ref = {"tests": ["assert square_perimeter(10) == 40"], "setup": ""}
    honest = "def square_perimeter(a):\n    return 4 * a"
    programs = list(hostile.items()) + [("honest", honest)]
    examples = [B.Example(name, "p", ref) for name, _ in programs]
    gens = [{"key": name, "text": f"```python\n{code}\n```"} for name, code in programs]
    s = harness.Settings(max_new_tokens={}, workdir=str(tmp_path / "run"), progress=False,
                         limits=Limits(timeout_s=3.0, memory_mb=512), workers=3)
    verdicts = {v["id"]: v for v in harness.score("mbpp", "m", examples, gens, s)}
    assert verdicts["honest"]["correct"] is True
    for name in hostile:
        assert verdicts[name]["correct"] is False, (name, verdicts[name])
    assert verdicts["loop"]["details"]["status"] == "timeout"
    assert verdicts["memory"]["details"]["status"] == "memory"
    assert verdicts["print"]["details"]["status"] == "output_limit"
    assert "PermissionError" in verdicts["write"]["details"]["reason"]
    assert sentinel.read_text() == "x" and not outside.exists()
    assert len(open(tmp_path / "run" / "scores" / "mbpp" / "m.jsonl").readlines()) == 8


def test_the_generation_cache_drops_a_line_cut_short_and_appends_after_it(tmp_path):
    from fr_jax.harness.runner import JsonlCache
    path = str(tmp_path / "gen.jsonl")
    with open(path, "w") as f:
        f.write(json.dumps({"id": "a", "key": "k", "text": "1"}) + "\n"
                + json.dumps({"id": "b", "key": "k", "text": "2"}) + "\n" + '{"id": "c", "ke')
    cache = JsonlCache(path)
    assert sorted(cache.records) == ["a", "b"] and cache.get("a", "k")["text"] == "1"
    assert cache.get("a", "other key") is None
    assert open(path).read().endswith("}\n")  # the cut line is gone, not glued to the next
    cache.add([{"id": "c", "key": "k", "text": "3"}])
    assert {r: v["text"] for r, v in JsonlCache(path).records.items()} == {
        "a": "1", "b": "2", "c": "3"}
