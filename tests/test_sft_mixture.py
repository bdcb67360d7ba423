"""The stage-1 SFT mixture builder (`python -m fr_jax.data.sft`): upstream formats in, one
deduplicated, decontaminated, sampled and shuffled JSONL and its manifest out.

Every input is a small file written here in its upstream format (GSM8K and MBPP JSONL, MATH
Parquet, a messages chat and a ShareGPT chat), with a GSM8K and an MBPP test file as the
decontamination benchmarks; no network, no jax compile."""

import hashlib
import json
import os
import random
import re
import runpy
import subprocess
import sys

import datasets
import numpy as np
import pytest

from fr_jax.corpus import tokenize_sft
from fr_jax.data import sft
from fr_jax.datagen import mixture as M
from fr_jax.harness import benchmarks as B
from fr_jax.harness import prompts as P
from fr_jax.runtime.errors import ConfigError, DataError

sys.path.insert(0, os.path.dirname(__file__))
from cli_env import REPO, one_device_env  # noqa: E402

# Made-up words: random texts over them share no 5-word shingle and no 13-word n-gram by
# chance; the filler words ("qq...") never occur in a test text.
VOCAB = [a + b for a in ("ka", "lo", "mi", "nu", "pe", "ro", "su", "ti", "va", "ze")
         for b in ("dan", "fel", "gor", "hul", "jin", "kes", "lom", "mur", "nix", "pov")]


def text(seed: int, n: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(VOCAB) for _ in range(n))


def filler(n: int, start: int = 0) -> str:
    return " ".join(f"qq{i}" for i in range(start, start + n))


Q30 = text(1, 30).split()  # a GSM8K test question of 30 words
Q_COPIED = text(2, 20)  # a GSM8K test question a training record copies verbatim
T_LONG = text(3, 15)  # an MBPP test task a training record copies verbatim
T_SHORT = text(4, 9)  # an MBPP test task shorter than ngram=13: one 9-word n-gram
PROBLEM_A = text(5, 60)  # a long MATH problem, and one word of it changed below
NEAR_A = " ".join(["differentword"] + PROBLEM_A.split()[1:])
HALF_A = " ".join(PROBLEM_A.split()[:30] + text(6, 30).split())  # clearly different


def gsm8k_answer(a: int, b: int) -> str:
    return f"Add them: <<{a}+{b}={a + b}>>{a + b} apples.\n#### {a + b}"


def jsonl(path, rows, extra_lines=()):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "".join(extra_lines))
    return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Every upstream file, by source name (the test sets as gsm8k_test / mbpp_test)."""
    d = tmp_path_factory.mktemp("upstream")
    q1 = text(10, 25)
    out = {"gsm8k": jsonl(d / "gsm8k_train.jsonl", [
        {"question": q1, "answer": gsm8k_answer(2, 3)},
        {"question": text(11, 25), "answer": gsm8k_answer(4, 5)},
        {"question": text(12, 25), "answer": gsm8k_answer(6, 7)},
        {"question": "  " + q1.upper().replace(" ", "   ") + " ", "answer": gsm8k_answer(2, 3)},
        {"question": Q_COPIED, "answer": gsm8k_answer(1, 1)},  # contaminated (gsm8k)
        {"question": text(13, 25), "answer": "no final line"},  # transform fails
        {"question": text(14, 25)},  # no answer field
    ], ["this line is not JSON\n"])}
    rows = [{"problem": PROBLEM_A, "solution": "So $x = \\boxed{5}$.", "level": "Level 2",
             "type": "Algebra"},
            {"problem": NEAR_A, "solution": "So $x = \\boxed{5}$.", "level": "Level 2",
             "type": "Algebra"},  # near duplicate of the first
            {"problem": HALF_A, "solution": "So $x = \\boxed{5}$.", "level": "Level 3",
             "type": "Algebra"},  # half the words shared: kept
            {"problem": f"{filler(6)} {' '.join(Q30[5:17])} {filler(6, 6)}",  # 12 words
             "solution": "It is $\\boxed{12}$.", "level": "Level 1", "type": "Geometry"},
            {"problem": f"{filler(6)} {' '.join(Q30[5:18])} {filler(6, 6)}",  # 13 words
             "solution": "It is $\\boxed{13}$.", "level": "Level 1", "type": "Geometry"},
            {"problem": "", "solution": "$\\boxed{0}$", "level": "Level 1", "type": "Algebra"}]
    out["math"] = str(d / "math_train.parquet")
    datasets.Dataset.from_list(rows).to_parquet(out["math"])
    out["mbpp"] = jsonl(d / "mbpp_train.jsonl", [
        {"task_id": 601, "text": text(20, 14), "code": "def f(x):\n    return x\n",
         "test_list": ["assert f(1) == 1", "assert f(2) == 2 "]},
        {"task_id": 602, "text": text(21, 14), "code": "def g():\n    return 0",
         "test_list": ["assert g() == 0"]},
        {"task_id": 603, "text": T_LONG, "code": "def h():\n    pass",
         "test_list": ["assert h() is None"]},  # contaminated (mbpp)
        {"task_id": 604, "text": text(22, 14), "code": "def k():\n    pass"},  # no tests
    ])
    hello = "Hello there, please write a short greeting for my neighbour Ada."
    out["chat"] = jsonl(d / "chat.jsonl", [
        {"messages": [{"role": "user", "content": hello},
                      {"role": "assistant", "content": "Good morning, Ada!"}]},
        {"messages": [{"role": "system", "content": "Answer in one word."},
                      {"role": "user", "content": text(30, 20)},
                      {"role": "assistant", "content": "Yes."}]},
        {"messages": [{"role": "user", "content": text(31, 20)}]},  # no answer
        {"messages": [{"role": "user", "content": text(32, 20)},
                      {"role": "assistant", "content": "  "}]},  # empty answer
    ])
    out["sharegpt"] = jsonl(d / "sharegpt.jsonl", [
        {"conversations": [{"from": "human", "value": text(40, 20)},
                           {"from": "gpt", "value": text(41, 10)}]},
        {"conversations": [{"from": "human", "value": f"{filler(5)} {T_SHORT} {filler(5, 5)}"},
                           {"from": "gpt", "value": text(42, 10)}]},  # contaminated (mbpp)
        {"conversations": [{"from": "human", "value": text(43, 20)},
                           {"from": "bot", "value": "?"}]},  # unknown role
        {"conversations": [{"from": "human", "value": hello.upper()},
                           {"from": "gpt", "value": "Good  morning, Ada!"}]},  # = chat's first
    ])
    out["gsm8k_test"] = jsonl(d / "gsm8k_test.jsonl", [
        {"question": " ".join(Q30), "answer": gsm8k_answer(8, 9)},
        {"question": Q_COPIED, "answer": gsm8k_answer(1, 1)}])
    out["mbpp_test"] = jsonl(d / "mbpp_test.jsonl", [
        {"task_id": 11, "text": T_LONG, "code": "pass", "test_list": ["assert True"]},
        {"task_id": 12, "text": T_SHORT, "code": "pass", "test_list": ["assert True"]}])
    return out


# The recipe a user would write for these files: a plain config file, loaded by path.
RECIPE = '''
import ml_collections

from fr_jax.datagen.mixture import source
from fr_jax.harness import prompts as P


def get_config():
    c = ml_collections.ConfigDict()
    c.output = @OUTPUT@
    c.seed = 0
    c.format = "prompt_response"
    c.total = 0
    c.progress = False
    c.sources = ml_collections.ConfigDict(sort_keys=False)
    c.sources.gsm8k = source(path=@GSM8K@, domain="math", prompt=P.GSM8K,
                             response="{answer}", transforms={"answer": "gsm8k_solution"})
    c.sources.math = source(path=@MATH@, domain="math", prompt=P.MATH500,
                            response="{solution}")
    c.sources.mbpp = source(path=@MBPP@, domain="code",
                            prompt=P.fill(P.MBPP, text="{text}", tests="{test_list}"),
                            response="{code}", transforms={"code": "python_block"})
    c.sources.chat = source(path=@CHAT@, domain="instr", messages="messages")
    c.sources.sharegpt = source(path=@SHAREGPT@, domain="instr", messages="conversations",
                                roles={"human": "user", "gpt": "assistant"},
                                role_key="from", content_key="value")
    c.dedup = ml_collections.ConfigDict(dict(exact=True, near=True, near_threshold=0.8,
                                             shingle=5, num_perm=64, bands=16))
    c.decontaminate = ml_collections.ConfigDict()
    c.decontaminate.benchmarks = ("gsm8k", "mbpp")
    c.decontaminate.data = ml_collections.ConfigDict({
        "gsm8k": {"path": @GSM8K_TEST@, "hub": ""}, "mbpp": {"path": @MBPP_TEST@, "hub": ""}})
    c.decontaminate.ngram = 13
    return c
'''


def write_recipe(files, folder) -> str:
    body = RECIPE.replace("@OUTPUT@", repr(str(folder / "out" / "mix.jsonl")))
    for name, path in files.items():
        body = body.replace(f"@{name.upper()}@", repr(path))
    path = folder / "recipe.py"
    path.write_text(body)
    return str(path)


@pytest.fixture
def recipe(files, tmp_path):
    """(the recipe file, its config) for the files, writing under tmp_path."""
    path = write_recipe(files, tmp_path)
    return path, runpy.run_path(path)["get_config"]()


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def tokenizer():
    """A byte-level BPE tokenizer with a plain chat template, trained here (no jax)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(VOCAB + ["def return assert python"], trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<pad>", "<eos>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")
    fast.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n"
                          "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
    return fast


EXPECTED = {  # per source: read, dropped, exact dup, near dup, contaminated, available
    "gsm8k": (8, {"bad_json": 1, "missing_field:answer": 1, "transform_failed:answer": 1},
              1, 0, {"gsm8k": 1}, 3),
    "math": (6, {"empty_field:problem": 1}, 0, 1, {"gsm8k": 1}, 3),
    "mbpp": (4, {"missing_field:test_list": 1}, 0, 0, {"mbpp": 1}, 2),
    "chat": (4, {"empty_response": 1, "last_turn_not_assistant": 1}, 0, 0, {}, 2),
    "sharegpt": (4, {"unknown_role:bot": 1}, 1, 0, {"mbpp": 1}, 1),
}


def test_every_record_is_accounted_for(recipe, capsys):
    """read = dropped (per reason) + duplicates + contaminated (per benchmark) + available,
    per source, with the manifest naming where, and the table printing the same counts."""
    _, config = recipe
    manifest = sft.build(config)
    for name, (read, dropped, exact, near, contaminated, available) in EXPECTED.items():
        e = manifest["sources"][name]
        assert (e["read"], e["dropped"], e["exact_duplicates"], e["near_duplicates"],
                e["contaminated"], e["available"], e["target"], e["kept"], e["short"]) == (
            read, dropped, exact, near, contaminated, available, available, available, 0), name
        assert read == sum(dropped.values()) + exact + near + sum(contaminated.values()) + \
            available
    assert manifest["totals"]["kept"] == manifest["records"] == 11
    assert manifest["totals"]["contaminated"] == 4 and manifest["totals"]["read"] == 26
    assert manifest["domains"] == {"code": 2, "instr": 3, "math": 6}
    g = manifest["sources"]["gsm8k"]
    assert g["examples"]["bad_json"] == [f"{config.sources.gsm8k.path}:8"]
    assert g["examples"]["exact_duplicate"] == [[f"{config.sources.gsm8k.path}:4",
                                                 f"{config.sources.gsm8k.path}:1"]]
    assert manifest["sources"]["math"]["examples"]["near_duplicate"] == [
        [f"{config.sources.math.path}[1]", f"{config.sources.math.path}[0]"]]
    # The copies dropped: the verbatim question and task, the 13-word fragment (the 12-word
    # one is kept), the 9-word test task inside a longer chat.
    assert {n: e["examples"].get("contaminated") for n, e in manifest["sources"].items()} == {
        "gsm8k": [[f"{config.sources.gsm8k.path}:5", "gsm8k"]],
        "math": [[f"{config.sources.math.path}[4]", "gsm8k"]],
        "mbpp": [[f"{config.sources.mbpp.path}:3", "mbpp"]], "chat": None,
        "sharegpt": [[f"{config.sources.sharegpt.path}:2", "mbpp"]]}
    assert g["inputs"] == [{"path": config.sources.gsm8k.path,
                            "sha256": M.sha256_of(config.sources.gsm8k.path)}]
    d = manifest["decontamination"]
    assert d["enabled"] and d["ngram"] == 13
    assert {b: v["test_texts"] for b, v in d["benchmarks"].items()} == {"gsm8k": 2, "mbpp": 2}
    assert manifest["recipe"]["sources"]["gsm8k"]["domain"] == "math"
    with open(config.output, "rb") as f:
        assert manifest["sha256"] == hashlib.sha256(f.read()).hexdigest()
    with open(M.manifest_path(config.output)) as f:
        assert json.load(f) == json.loads(json.dumps(manifest))  # tuples as lists
    printed = capsys.readouterr().out
    assert re.search(r"^total\s+26\s+8\s+2\s+1\s+4\s+11\s+11\s+11\s+0$", printed, re.M), printed
    assert "wrote 11 examples to" in printed
    assert sorted(os.listdir(os.path.dirname(config.output))) == [  # no temporary file left
        "mix.jsonl", "mix.manifest.json"]


def test_records_are_in_the_requested_format(recipe, files):
    """prompt_response records: the eval harness's prompts, transformed responses, a system
    turn kept in a message-list prompt; all of them tokenizable for SFT."""
    _, config = recipe
    sft.build(config)
    rows = read_jsonl(config.output)
    assert all(list(r) == ["prompt", "response", "source", "domain"] for r in rows)
    by_source = {}
    for r in rows:
        by_source.setdefault(r["source"], []).append(r)
    with open(files["gsm8k"]) as f:
        q = json.loads(f.readline())
    first = next(r for r in by_source["gsm8k"] if r["prompt"] == P.gsm8k(q["question"]))
    assert first["response"] == B.gsm8k_solution(q["answer"]) == (
        "Add them: 5 apples.\nThe final answer is $\\boxed{5}$.")
    m = read_jsonl(files["mbpp"])[0]
    first = next(r for r in by_source["mbpp"] if r["prompt"] == P.mbpp(m["text"], m["test_list"]))
    assert first["response"] == "```python\ndef f(x):\n    return x\n```"
    kept12 = [r for r in by_source["math"] if " ".join(Q30[5:17]) in r["prompt"]]
    assert len(kept12) == 1 and kept12[0]["prompt"].endswith(P.MATH_INSTRUCTION)
    assert {r["prompt"].split("\n")[0] for r in by_source["math"]} == {
        PROBLEM_A, HALF_A, kept12[0]["prompt"].split("\n")[0]}
    system = [r for r in by_source["chat"] if isinstance(r["prompt"], list)]
    assert [m["role"] for m in system[0]["prompt"]] == ["system", "user"]
    assert system[0]["response"] == "Yes."
    assert {r["domain"] for r in by_source["sharegpt"]} == {"instr"}
    examples, report = tokenize_sft(rows, tokenizer(), seq_len=4096)
    assert report.kept == 11 and not report.skipped


def test_messages_format(recipe):
    _, config = recipe
    config.format = "messages"
    sft.build(config)
    rows = read_jsonl(config.output)
    assert len(rows) == 11 and all(list(r) == ["messages", "source", "domain"] for r in rows)
    roles = sorted(tuple(m["role"] for m in r["messages"]) for r in rows)
    assert roles == sorted([("user", "assistant")] * 10 + [("system", "user", "assistant")])
    examples, report = tokenize_sft(rows, tokenizer(), seq_len=4096)
    assert report.kept == 11


def test_same_seed_same_bytes_other_seed_other_order(recipe):
    _, config = recipe
    first = sft.build(config)
    with open(config.output, "rb") as f:
        data = f.read()
    with open(M.manifest_path(config.output), "rb") as f:
        manifest = f.read()
    again = sft.build(config)
    with open(config.output, "rb") as f:
        assert f.read() == data
    with open(M.manifest_path(config.output), "rb") as f:
        assert f.read() == manifest
    assert again["sha256"] == first["sha256"]
    config.seed = 7
    other = sft.build(config)
    with open(config.output, "rb") as f:
        reseeded = f.read()
    assert other["sha256"] != first["sha256"] and reseeded != data
    assert sorted(reseeded.splitlines()) == sorted(data.splitlines())


def test_counts_weights_and_the_shortfall(recipe):
    _, config = recipe
    config.sources.gsm8k.count = 2  # of 3: a seeded sample
    config.sources.math.count = 5  # of 3: all kept, 2 short
    manifest = sft.build(config)
    e = {n: (v["available"], v["target"], v["kept"], v["short"])
         for n, v in manifest["sources"].items()}
    assert e == {"gsm8k": (3, 2, 2, 0), "math": (3, 5, 3, 2), "mbpp": (2, 2, 2, 0),
                 "chat": (2, 2, 2, 0), "sharegpt": (1, 1, 1, 0)}
    assert manifest["records"] == 10 and manifest["totals"]["short"] == 2
    config.sources.gsm8k.count = config.sources.math.count = 0
    config.total = 6
    config.sources.gsm8k.weight, config.sources.math.weight = 2.0, 1.0
    manifest = sft.build(config)
    e = {n: (v["target"], v["kept"], v["short"]) for n, v in manifest["sources"].items()}
    # weighted: round(6 * 2 / 3) = 4 of 3 available, round(6 * 1 / 3) = 2; the rest: all
    assert e == {"gsm8k": (4, 3, 1), "math": (2, 2, 0), "mbpp": (2, 2, 0), "chat": (2, 2, 0),
                 "sharegpt": (1, 1, 0)}


def test_decontamination_off(recipe):
    _, config = recipe
    config.decontaminate.benchmarks = ()
    manifest = sft.build(config)
    assert manifest["decontamination"] == {"enabled": False, "ngram": 13,
                                           "compared": "prompt and response", "benchmarks": {}}
    assert manifest["records"] == 15 and manifest["totals"]["contaminated"] == 0


def test_hub_sources_read_every_subset(recipe, monkeypatch):
    _, config = recipe
    calls = []

    def fake_load(name, subset=None, split=None):
        calls.append((name, subset, split))
        return datasets.Dataset.from_list([{"problem": f"{subset} {text(50 + len(calls), 20)}",
                                            "solution": "$\\boxed{1}$"}])
    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    config.sources.math.path = ""
    config.sources.math.hub = "someone/math::train"
    config.sources.math.subsets = ("algebra", "geometry")
    manifest = sft.build(config)
    assert calls == [("someone/math", "algebra", "train"), ("someone/math", "geometry", "train")]
    e = manifest["sources"]["math"]
    assert (e["read"], e["kept"]) == (2, 2)
    assert [(i["hub"], i["subset"], i["split"]) for i in e["inputs"]] == [
        ("someone/math", "algebra", "train"), ("someone/math", "geometry", "train")]
    assert all(i["fingerprint"] for i in e["inputs"])

    def offline(*a, **k):
        raise ConnectionError("no network")
    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match=r"^sources\.math: cannot load someone/math:algebra:"
                       r"train from the hub \(ConnectionError: no network\); download it and "
                       r"set --config\.sources\.math\.path=<local file or folder>$"):
        sft.build(config)


def test_bad_recipes_fail_with_one_clear_line(recipe, files, monkeypatch):
    path, _ = recipe

    def fails(change, error, message):
        config = runpy.run_path(path)["get_config"]()
        change(config)
        with pytest.raises(error) as e:
            sft.build(config)
        assert str(e.value) == message

    def set_source(name, **fields):
        return lambda c: c.sources[name].update(fields)

    def misspell(c):  # a recipe file's typo: source() keeps the field for the check to name
        c.sources.gsm8k = M.source(**M.as_dict(c.sources.gsm8k), promt="{question}")
    fails(misspell, ConfigError, "sources.gsm8k: unknown field(s) promt; a source has "
          + ", ".join(M.SOURCE_DEFAULTS))
    fails(set_source("gsm8k", prompt="{quesion}"), ConfigError,
          "sources.gsm8k: no record has the field 'quesion' that its templates read; the "
          "records have: answer, question")
    fails(lambda c: c.sources.mbpp.transforms.update({"code": "python_fence"}), ConfigError,
          "sources.mbpp: transforms.code: unknown transform 'python_fence'; choose from "
          "gsm8k_solution, python_block, strip")
    fails(lambda c: setattr(c.decontaminate, "benchmarks", ("gsm8k", "gsm8k_plus")),
          ConfigError, "--config.decontaminate.benchmarks: unknown benchmark 'gsm8k_plus'; "
          f"choose from {', '.join(B.BENCHMARKS)}")
    fails(set_source("chat", path=""), ConfigError,
          "sources.chat: neither hub nor path is set; set --config.sources.chat.path=<local "
          "copy in its upstream format> or --config.sources.chat.hub=<owner/name[:subset"
          "[:split]]>")
    fails(set_source("chat", path="/no/such/chat.jsonl"), DataError,
          "sources.chat.path: '/no/such/chat.jsonl' does not exist; point --config.sources."
          "chat.path at a local copy (JSONL, JSON, Parquet or a saved datasets folder)")
    fails(set_source("math", messages="problem"), ConfigError,
          "sources.math: set either both prompt and response templates, or messages (a chat "
          "field)")
    fails(lambda c: setattr(c, "total", 100), ConfigError,
          "weights need a total and a total needs weights: set --config.total > 0 and "
          "--config.sources.<name>.weight, or use counts with total=0")

    def offline(*a, **k):
        raise ConnectionError("no network")
    monkeypatch.setattr(datasets, "load_dataset", offline)
    fails(lambda c: setattr(c.decontaminate, "benchmarks", ("gsm8k", "math500")), DataError,
          "decontamination benchmark math500: its test data cannot be loaded (cannot load "
          "'HuggingFaceH4/MATH-500::test' from the hub (ConnectionError: no network); "
          "download it and set a local path instead); set --config.decontaminate.data."
          "math500.path=<local test file> or remove math500 from "
          "--config.decontaminate.benchmarks")
    fails(lambda c: c.decontaminate.data.mbpp.update({"path": "/no/mbpp.jsonl"}), DataError,
          "decontamination benchmark mbpp: its test data cannot be loaded (no file at "
          "'/no/mbpp.jsonl'); set --config.decontaminate.data.mbpp.path=<local test file> or "
          "remove mbpp from --config.decontaminate.benchmarks")


def test_command_line(files, tmp_path):
    """The CLI end to end in a subprocess: a success, then a bad path as a one-line error."""
    path = write_recipe(files, tmp_path)
    out = tmp_path / "cli" / "mix.jsonl"
    env = dict(one_device_env(tmp_path / "home"), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    start = lambda *a: subprocess.Popen(  # noqa: E731
        [sys.executable, "-m", "fr_jax.data.sft", f"--config={path}", *a], cwd=REPO, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    runs = [start(f"--config.output={out}", "--seed=3"),  # both at once: imports dominate
            start(f"--config.output={out}", "--config.sources.gsm8k.path=/no/gsm8k.jsonl")]
    (ok, ok_err), (_, bad_err) = (r.communicate(timeout=300) for r in runs)
    assert runs[0].returncode == 0, ok_err
    assert f"wrote 11 examples to {out}" in ok
    assert "decontamination: gsm8k (2 test texts), mbpp (2 test texts), 13-word n-grams" in ok
    manifest = json.loads((tmp_path / "cli" / "mix.manifest.json").read_text())
    assert manifest["recipe"]["seed"] == 3 and len(read_jsonl(out)) == 11
    assert runs[1].returncode == 1
    assert bad_err.strip().splitlines()[-1] == (
        "error: sources.gsm8k.path: '/no/gsm8k.jsonl' does not exist; point --config.sources."
        "gsm8k.path at a local copy (JSONL, JSON, Parquet or a saved datasets folder)")


def test_shipped_recipe(tmp_path):
    """configs/data/three_domains.py loads and checks; it names only known benchmarks and
    transforms, and each source's templates read only the fields its comment documents."""
    path = os.path.join(REPO, "configs", "data", "three_domains.py")
    config = runpy.run_path(path)["get_config"]()
    sources = sft.read_recipe(config)
    assert [s.name for s in sources] == ["gsm8k", "math", "mbpp", "magicoder", "tulu_if"]
    assert {s.domain for s in sources} == {"math", "code", "instr"}
    assert set(config.decontaminate.benchmarks) == {"gsm8k", "math500", "humaneval", "mbpp",
                                                    "ifeval"} <= set(B.BENCHMARKS)
    assert {t for s in sources for t in s.transforms.values()} <= set(M.TRANSFORMS)
    # The comment block right above each `c.sources.<name> = source(` has "fields: a, b".
    blocks = re.findall(r"((?:\n *#[^\n]*)+)\n *c\.sources\.(\w+) = source\(", open(path).read())
    documented = {name: re.search(r"fields: ([\w, ]+)", block).group(1)
                  for block, name in blocks}
    assert set(documented) == {s.name for s in sources}
    for s in sources:
        fields = {f.strip() for f in documented[s.name].split(",")}
        assert set(M.source_fields(s)) | set(s.transforms) <= fields, s.name
        assert s.hub and not s.path
    assert sum(s.count for s in sources) + 7473 + 7500 + 374 > 55000  # ~60k in all
    assert config.sources.math.subsets == ("algebra", "counting_and_probability", "geometry",
                                           "intermediate_algebra", "number_theory",
                                           "prealgebra", "precalculus")
    assert os.path.exists(sft.cli.default_config_file(sft.COMMAND.config_file))


def test_minhash_finds_what_jaccard_confirms():
    """MinHash signatures agree in about the share of hashes that the Jaccard predicts."""
    rng = np.random.default_rng(0)
    a = rng.integers(1, M._P, 256, dtype="uint64")
    b = rng.integers(0, M._P, 256, dtype="uint64")
    ws = text(60, 200).split()
    other = ws[:150] + text(61, 50).split()
    sa, sb = (M.minhash(M.gram_keys(w, 5), a, b) for w in (ws, other))
    sh_a, sh_b = M.shingles(ws, 5), M.shingles(other, 5)
    jaccard = len(sh_a & sh_b) / len(sh_a | sh_b)
    assert abs((sa == sb).mean() - jaccard) < 0.1
    assert M.minhash(M.gram_keys([], 5), a, b).tolist() == [M._P] * 256  # empty: no crash
    assert M.words("Don't  STOP_now: x2") == ["don", "t", "stop", "now", "x2"]
