"""The embedded demo world: tasks, the reduced end-to-end pipeline, and the bundled checkpoints."""

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from fr_jax.harness import toy_world as W
from fr_jax.runtime.bundle import bundled_world
from tb_events import read_events
from cli_env import REPO, one_device_env  # noqa: E402





# ------------------------------------------------------------------------------ the world
def test_tokenizer_round_trips_every_task_and_the_chat_format():
    tok = W.build_tokenizer()
    data = W.make_world_data(50, 10, seed=3)
    for d in W.EVAL_DOMAINS:
        for t in data.test[d] + data.train[d]:
            for text in (t.prompt, t.answer):
                ids = tok(text, add_special_tokens=False)["input_ids"]
                assert len(ids) == len(text) and tok.unk_token_id not in ids
                assert tok.decode(ids) == text
    rendered = tok.apply_chat_template([{"role": "user", "content": "add 1+2"}],
                                       add_generation_prompt=True, tokenize=False)
    assert rendered == W.BOS + "add 1+2\n"


def test_tasks_are_correct_seeded_and_held_out():
    a, b = W.make_world_data(300, 40, seed=1), W.make_world_data(300, 40, seed=1)
    assert a.test == b.test and a.train == b.train
    assert W.make_world_data(300, 40, seed=2).test != a.test
    for d in W.EVAL_DOMAINS:
        test_cores = {W._core(t.prompt) for t in a.test[d]}
        assert not test_cores & {W._core(t.prompt) for t in a.train[d]}, d
    # The answers, checked independently of the generators.
    for t in a.test["math"]:
        x, y = W._core(t.prompt).split(" ")[1].split("+")
        assert int(t.answer) == int(x) + int(y)
    for t in a.test["code"] + a.test["instr"]:
        op, word = W._core(t.prompt).split(" ")
        want = {"rev": word[::-1], "rot": word[1:] + word[0], "caps": word.upper(),
                "wrap": "[" + word + "]", "twice": word + " " + word}[op]
        assert t.answer == want
    for t in a.test["mixed"]:
        fmt, inner = W._core(t.prompt).split(" ", 1)
        assert fmt in ("wrap", "twice") and inner.split(" ")[0] in ("add", "rev", "rot")
        assert (t.answer.startswith("[") and t.answer.endswith("]")) if fmt == "wrap" else \
            t.answer.split(" ")[0] == t.answer.split(" ")[1]
    assert W.score("55", " 55\n") and not W.score("55", "56")


# ------------------------------------------------------------------------------ the pipeline
QUICK = ["--config=configs/demo.py:quick"]


def _quick_run(root):
    """The reduced demo (smaller models, fewer steps), end to end through the CLI."""
    out = subprocess.run([sys.executable, "-m", "fr_jax.demo", *QUICK,
                          f"--config.train.workdir={root / 'run'}",
                          "--config.demo.progress=False"],
                         cwd=REPO, env=one_device_env(root / "home", fast_compile=False),
                         capture_output=True, text=True, timeout=1500)
    assert out.returncode == 0, out.stderr[-3000:]
    return root / "run", json.load(open(root / "run" / "results.json")), out.stdout


@pytest.mark.slow
def test_quick_demo_end_to_end(tmp_path):
    """One reduced run (from the bundled experts, about seven minutes on two cores), checked
    three ways: its outputs, the claim, the baselines' rows."""
    run, results, stdout = _quick_run(tmp_path)
    _writes_the_table_plot_tensorboard_and_hf_experts(run, results, stdout)
    _shows_the_claim(results)
    _has_the_baseline_rows(run, results)


def _writes_the_table_plot_tensorboard_and_hf_experts(run, results, stdout):
    from fr_jax.hf import load_hf

    assert "| FusionRoute (`fusionroute`) |" in stdout
    for ext in ("json", "md", "png"):
        assert (run / f"results.{ext}").stat().st_size > 0
    assert open(run / "results.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    # What `tensorboard --logdir <workdir>` shows, read with TensorBoard's own reader: the
    # table as text and every accuracy as a scalar; the router's training curves.
    ev = read_events(run / "tensorboard" / "eval")
    assert "| FusionRoute (`fusionroute`) |" in ev["text"]["results"][0][1]
    for mode, acc in results["accuracy"].items():
        for d, v in acc.items():  # expert:0 is shown as expert_0
            tag = f"eval/{d}/{mode.replace(':', '_')}"
            assert ev["scalars"][tag] == [(0, pytest.approx(v))], (mode, d)
    for stage, tag in (("sft", "train/route_loss"), ("cdpo", "train/reward_margin")):
        scalars = read_events(run / "train" / "router" / "tensorboard" / stage)["scalars"]
        assert {"train/loss", "train/lr", "train/grad_norm", tag} <= set(scalars), stage
    cfg, _ = load_hf(str(run / "experts" / "math"))  # a real HF folder, read back
    assert cfg.model_type == "llama"
    assert set(results["modes"]) >= {"expert:0", "expert:1", "expert:2", "router_only",
                                     "expert_only", "sequence:head", "sequence", "mixture",
                                     "merged:ta", "merged:ties", "finetuned", "fusionroute",
                                     "oracle"}


def _shows_the_claim(r):
    """The orderings the issue asks for, with margins every measured seed of the reduced run
    reaches (docs/demo.md: seeds 0-2 from the bundled experts, 98 / 100 / 100 on their own
    domains). FusionRoute against token routing (`expert_only`): mixed 28 / 11 / 19 against
    0; on the skill domains at most 2 points below (math 97 / 97 / 96); 50-60 points above
    the router alone on average. The margins asserted are smaller than measured (another
    machine's XLA kernels give other numbers); docs/demo.md has the full run."""
    acc, avg = r["accuracy"], r["average"]
    for i, d in enumerate(W.DOMAINS):  # each expert: best on its own domain, poor elsewhere
        own = acc[f"expert:{i}"][d]
        for j in range(len(W.DOMAINS)):
            if j != i:
                assert acc[f"expert:{j}"][d] <= own - 0.1, (d, j, own)
                assert acc[f"expert:{i}"][W.DOMAINS[j]] <= 0.05, (d, j)
    fr, eo = acc["fusionroute"], acc["expert_only"]
    assert fr["mixed"] >= eo["mixed"] + 0.05, (fr, eo)
    for d in W.DOMAINS:
        assert fr[d] >= eo[d] - 0.08, (d, fr, eo)
    assert avg["fusionroute"] >= avg["sequence:head"] + 0.05
    assert avg["fusionroute"] >= avg["router_only"] + 0.05
    shares = r["shares"]["fusionroute"]
    for d in W.DOMAINS:  # the router sends each domain to its own expert
        assert shares[d][d] > 0.6, (d, shares[d])


def _has_the_baseline_rows(run, r):
    """Issue 6's rows: SharedTrunkNet (its probes and report), the merges, the oracle."""
    acc = r["accuracy"]
    for d in W.EVAL_DOMAINS:  # the oracle is the per-prompt best expert: its ceiling
        best = max(acc[f"expert:{i}"][d] for i in range(3))
        assert best <= acc["oracle"][d] <= sum(acc[f"expert:{i}"][d] for i in range(3)) + 1e-9
    report = json.load(open(run / "seqroute" / "report.json"))
    assert report["targets"] == ["expert:0", "expert:1", "expert:2", "fusionroute"]
    assert (run / "seqroute" / "probes.png").stat().st_size > 0
    for tag in ("ta", "ties"):
        assert json.load(open(run / "merged" / tag / "merge.json"))["method"] in (
            "task_arithmetic", "ties")


# ------------------------------------------------------------------------------ the bundle
def test_bundled_world_matches_its_manifest_and_decodes_by_default(capsys):
    from fr_jax.decode import main as decode_main
    from fr_jax.runtime.bundle import BUNDLE, bundled_world

    world = bundled_world()
    manifest = json.load(open(os.path.join(BUNDLE, "MANIFEST.json")))
    total = 0
    for rel, digest in manifest.items():
        data = open(os.path.join(BUNDLE, rel), "rb").read()
        total += len(data)
        assert hashlib.sha256(data).hexdigest() == digest, rel
    assert total < 12 * 2**20  # a few MB: seven small models and a SharedTrunkNet
    res = decode_main(["--config.decode.max_new_tokens=12"])
    out = capsys.readouterr().out
    assert "tokens per expert" in out and res.lengths.min() > 0
    assert set(np.unique(res.chosen[res.chosen >= 0])) <= {0, 1, 2}
    assert world["names"] == list(W.DOMAINS)


@pytest.mark.slow
def test_bundled_checkpoints_reproduce_their_table():
    """Regenerating the bundle (`python -m fr_jax.demo --config.bundle=...`) takes about
    ten minutes, too long for every CI run, and XLA's CPU kernels may differ in the last
    bits between machines, so the bundle is checked through its table instead: the shipped
    checkpoints, evaluated here on the same held-out prompts, give exactly the accuracies
    the bundling run recorded. (Bit-for-bit determinism of the pipeline itself is checked
    by `test_pipeline_is_deterministic`.)"""
    import runpy

    from fr_jax.config import default_config_file
    from fr_jax.toy import pipeline as demo

    world = bundled_world()
    recorded = json.load(open(world["results"]))
    cfg = runpy.run_path(default_config_file("demo.py"))["get_config"]("")
    cfg.demo.progress = False
    cfg.eval.modes = ("expert_only", "fusionroute")
    data = W.make_world_data(cfg.world.n_train, cfg.world.n_test, cfg.world.seed)
    tests = [t for d in W.EVAL_DOMAINS for t in data.test[d]]
    lineup = demo.load_world_lineup(world["router"], world["experts"], {})
    got = demo.evaluate(cfg, lineup, tests)
    for mode in cfg.eval.modes:
        assert got["accuracy"][mode] == recorded["accuracy"][mode], mode
        for d, shares in got["shares"][mode].items():
            for name, v in shares.items():
                assert abs(v - recorded["shares"][mode][d][name]) < 1e-4, (mode, d, name)


@pytest.mark.slow
def test_pipeline_is_deterministic(tmp_path):
    """Two runs of a micro pipeline with one seed, from random inits (bases, experts,
    router; no baselines), give bit-identical experts, router and table."""
    args = [*QUICK, "--config.demo.start_from=", "--config.demo.progress=False",
            "--config.world.n_test=16", "--config.demo.base.steps=6",
            "--config.demo.router_base.steps=6", "--config.demo.experts.steps=6",
            "--config.demo.experts.steps_by_domain.math=6", "--config.train.sft.steps=6",
            "--config.train.cdpo.steps=4", "--config.pairs.sources.toy.limit=24",
            "--config.pairs.samples=1", "--config.eval.modes=('expert_only', 'fusionroute')",
            "--config.demo.baselines=False"]  # the quick demo runs them; nothing here reads them
    digests = []
    for name in ("a", "b"):
        run = tmp_path / name
        subprocess.run([sys.executable, "-m", "fr_jax.demo", *args,
                        f"--config.train.workdir={run}"], cwd=REPO,
                       env=one_device_env(tmp_path / "home"),  # a few steps: compile-bound
                       check=True, capture_output=True, timeout=900)
        files = [run / "experts" / d / "model.safetensors" for d in W.DOMAINS] + [
            run / "train" / "router" / "cdpo" / "router" / f for f in
            ("model.safetensors", "routing_head.safetensors")]
        res = json.load(open(run / "results.json"))
        digests.append(([hashlib.sha256(open(f, "rb").read()).hexdigest() for f in files],
                        res["accuracy"], res["shares"]))
    assert digests[0] == digests[1]
