"""The router-training ablation (fr_jax.ablate): its summary (means and spreads over seeds)
and pick rule on given numbers, and a micro ablation through the CLI on the bundled experts
(2 variants x 1 seed, a few steps each) that trains only routers, writes the table and
resumes run by run."""

import hashlib
import json
import runpy
import statistics
import subprocess
import sys

import pytest

from fr_jax import ablate
from fr_jax.config import default_config_file
from fr_jax.harness import toy_world as W
from fr_jax.runtime.bundle import BUNDLE
from fr_jax.runtime.errors import ConfigError
from fr_jax.toy import ablation as A
from cli_env import REPO, one_device_env


def _config(**changes):
    c = runpy.run_path(default_config_file("ablation.py"))["get_config"]()
    for k, v in changes.items():
        c[k] = v
    return c


def _results(fr, eo, seconds=10.0):
    """A run's results.json as the pipeline writes it: accuracy per mode and domain."""
    acc = {"fusionroute": dict(zip(W.EVAL_DOMAINS, fr)),
           "expert_only": dict(zip(W.EVAL_DOMAINS, eo)),
           "router_only": dict(zip(W.EVAL_DOMAINS, [0.1] * 4))}
    return {"accuracy": acc, "average": {m: statistics.fmean(a.values()) for m, a in acc.items()},
            "timings_s": {"router SFT": seconds, "preference pairs": 1.0, "router CDPO": 2.0,
                          "evaluation": 99.0}}


def test_the_summary_gives_means_and_spreads_and_picks_by_the_rule():
    """The pick: the highest FusionRoute average among variants within 1 point of
    expert_only on every skill domain -- not the highest average overall."""
    cfg = _config(variants=("router_lm", "fused_all", "mix"), seeds=(0, 1))
    eo = [0.99, 1.0, 1.0, 0.0]
    runs = {
        # the best average, but 3 points lost on math: not eligible
        "fused_all": [_results([0.96, 1.0, 1.0, 0.9], eo), _results([0.96, 1.0, 1.0, 0.8], eo)],
        "mix": [_results([0.99, 1.0, 1.0, 0.3], eo), _results([0.985, 1.0, 1.0, 0.5], eo)],
        "router_lm": [_results([0.99, 1.0, 1.0, 0.1], eo, 20.0),
                      _results([0.99, 1.0, 1.0, 0.1], eo, 30.0)],
    }
    s = A.summarise(cfg, runs)
    mix = s["variants"]["mix"]
    assert mix["accuracy"]["fusionroute"]["mixed"]["values"] == [0.3, 0.5]
    assert mix["accuracy"]["fusionroute"]["mixed"]["mean"] == pytest.approx(0.4)
    assert mix["accuracy"]["fusionroute"]["mixed"]["std"] == pytest.approx(0.1414213, rel=1e-5)
    assert s["variants"]["router_lm"]["router_time_s"]["mean"] == pytest.approx(28.0)
    assert [s["variants"][n]["keeps_skills"] for n in ("fused_all", "mix", "router_lm")] == \
        [False, True, True]
    assert s["pick"] == "mix"
    # Equal averages (float sums in another order) go to the smaller spread.
    steady = [_results([0.99, 1.0, 1.0, x], eo) for x in (0.2, 0.2, 0.2)]
    spread = [_results([0.99, 1.0, 1.0, x], eo) for x in (0.3, 0.1, 0.2)]
    for order in (("sft_mix_1", "sft_mix_kl_1"), ("sft_mix_kl_1", "sft_mix_1")):
        runs = dict(zip(order, (steady, spread)))
        assert A.summarise(_config(variants=order, seeds=(0, 1, 2)), runs)["pick"] == order[0]
    text = A.markdown(s)
    assert "| **mix** | 98.8 ± 0.4 | 100.0 ± 0.0 | 100.0 ± 0.0 | 40.0 ± 14.1 |" in text
    assert "| fused_all |" in text and text.rstrip().endswith("mix")


def test_an_unknown_variant_or_field_is_refused_before_any_work(tmp_path):
    with pytest.raises(SystemExit, match="unknown variant 'fused'.*router_lm"):
        ablate.main([f"--config.workdir={tmp_path}", "--config.variants=('fused',)"])
    cfg = _config(variants=("router_lm",), workdir=str(tmp_path))
    cfg.definitions.router_lm.train.sft.lm_targets = "fused"  # a typo must not run as default
    with pytest.raises(ConfigError,
                       match="definitions.router_lm.train.sft.lm_targets is not a field"):
        A.run_ablation(cfg)
    assert not list(tmp_path.iterdir())


# demo.router_base.steps: a 3 x 80 router has no bundled base of its size (the bundle's
# router is the default 3 x 64), so its runs pretrain one.
MICRO = ["--config.common=('world.n_test=16', 'train.sft.steps=6', 'train.cdpo.steps=4', "
         "'pairs.sources.toy.limit=24', 'pairs.samples=1', 'demo.router_base.steps=6')"]


def _sha(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.mark.slow
def test_micro_ablation_trains_only_routers_writes_the_table_and_resumes(tmp_path):
    work = tmp_path / "abl"
    cmd = [sys.executable, "-m", "fr_jax.ablate", f"--config.workdir={work}",
           "--config.variants=('mid_mix', 'router_expert_size')",
           "--config.seeds=(1,)", "--config.modes=('fusionroute', 'expert_only')",
           "--config.progress=False", f"--config.results_dir={tmp_path / 'kept'}", *MICRO]
    env = one_device_env(tmp_path / "home")
    first = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    assert first.stdout.count("[ablation] ") == 2
    summary = json.load(open(work / "ablation.json"))
    assert list(summary["variants"]) == ["mid_mix", "router_expert_size"]
    for name, v in summary["variants"].items():
        for mode in ("fusionroute", "expert_only"):
            for d in W.EVAL_DOMAINS:
                cell = v["accuracy"][mode][d]
                assert len(cell["values"]) == 1 and cell["mean"] == cell["values"][0]
        assert v["router_time_s"]["mean"] > 0 and "keeps_skills" in v
    table = (work / "ablation.md").read_text()  # the rule's pick is in bold
    assert all(f"| {v} |" in table or f"| **{v}** |" in table for v in summary["variants"])
    bundled = {d: _sha(f"{BUNDLE}/{d}/model.safetensors") for d in W.DOMAINS}
    for name in summary["variants"]:
        for seed in (1,):
            run = work / "runs" / name / f"seed{seed}"
            # the experts are the bundle's, never retrained; only the router trained
            assert {d: _sha(run / "experts" / d / "model.safetensors")
                    for d in W.DOMAINS} == bundled
            # ... and, for a 3 x 80 router (no bundled base of its size), its base
            trained = ["router"] if name == "router_expert_size" else ["router", "router_base"]
            assert sorted(p.name for p in (run / "train").iterdir()) == trained
            fields = json.load(open(run / "train" / "router" / "sft" / "run.json"))["run"]["fields"]
            assert (fields["train.sft.lm_target"], fields["train.sft.lm_positions"]) == \
                (("mix", "all") if name == "mid_mix" else ("router", "all"))
    # The expert-sized router starts from the experts' base (same pretraining, same size).
    big = work / "runs" / "router_expert_size" / "seed1"
    assert _sha(big / "router_base" / "model.safetensors") == \
        _sha(f"{BUNDLE}/base/model.safetensors")
    assert json.load(open(big / "train" / "router" / "cdpo" / "router" /
                          "config.json"))["hidden_size"] == 96
    # A variant's own router size holds, whatever the demo's default (3 x 64).
    mid = work / "runs" / "mid_mix" / "seed1"
    assert json.load(open(mid / "train" / "router" / "cdpo" / "router" /
                          "config.json"))["hidden_size"] == 80

    # Re-run: nothing is trained again; a run whose results.json is gone is finished
    # from its own steps (training and pairs done, answers cached) and the table is equal.
    (work / "runs" / "mid_mix" / "seed1" / "results.json").unlink()
    (tmp_path / "kept" / "quick" / "runs" / "mid_mix" / "seed1.json").unlink()
    again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("[ablation] ") == 1 and "mid_mix, seed 1" in again.stdout
    redone = json.load(open(work / "ablation.json"))
    for name in summary["variants"]:
        assert redone["variants"][name]["accuracy"] == summary["variants"][name]["accuracy"]

    # The evidence kept beside (results_dir: each run's results with its definition, and
    # the table) stands for a run whose folder is gone: read back, not retrained.
    kept = tmp_path / "kept" / "quick"
    assert json.load(open(kept / "ablation.json"))["variants"] == redone["variants"]
    record = json.load(open(kept / "runs" / "router_expert_size" / "seed1.json"))
    assert record["identity"]["changes"]["demo"]["router_model"]["hidden_size"] == 96
    import shutil
    shutil.rmtree(work / "runs")
    third = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert third.returncode == 0, third.stderr[-3000:]
    assert "[ablation] " not in third.stdout
    assert json.load(open(work / "ablation.json"))["variants"] == redone["variants"]


def test_the_scale_summary_takes_each_seed_s_best_baseline_and_plots_the_margin(tmp_path):
    """The scale sweep's margin: per seed, FusionRoute's average minus the best of
    fine-tuned / sequence / expert_only on that seed (not the best mean), by size."""
    cfg = _config(variants=("router_lm", "router_4x128"), seeds=(0, 1),
                  modes=("fusionroute", "expert_only", "finetuned", "sequence"))
    eo = [0.99, 1.0, 1.0, 0.0]  # average 0.7475

    def run(fr, finetuned, sequence):
        r = _results(fr, eo)
        for mode, avg in (("finetuned", finetuned), ("sequence", sequence)):
            r["accuracy"][mode] = dict(zip(W.EVAL_DOMAINS, [avg] * 4))
            r["average"][mode] = avg
        return r

    runs = {"router_lm": [run([0.99, 1.0, 1.0, 0.2], 0.70, 0.78),     # fr 0.7975
                          run([0.99, 1.0, 1.0, 0.2], 0.85, 0.70)],    # fr 0.7975
            "router_4x128": [run([0.99, 1.0, 1.0, 0.6], 0.70, 0.80),  # fr 0.8975
                             run([0.99, 1.0, 1.0, 0.6], 0.60, 0.70)]}
    sizes = {"router_lm": {"router": 150_000, "experts": 300_000},
             "router_4x128": {"router": 750_000, "experts": 300_000}}
    s = A.summarise(cfg, runs, sizes)
    small, large = s["variants"]["router_lm"]["margin"], s["variants"]["router_4x128"]["margin"]
    assert small["best_baseline"] == ["sequence", "finetuned"]
    assert small["values"] == pytest.approx([0.0175, -0.0525])
    assert large["best_baseline"] == ["sequence", "expert_only"]
    assert large["values"] == pytest.approx([0.0975, 0.15])
    assert s["variants"]["router_4x128"]["parameters"] == sizes["router_4x128"]
    table = A.scale_markdown(s)
    assert ("| router_4x128 | 750,000 | 300,000 | 89.8 ± 0.0 | 65.0 ± 7.1 | 75.0 ± 7.1 | "
            "74.8 ± 0.0 | 12.4 ± 3.7 | sequence / expert_only |") in table
    claim = A.claim_markdown(s, runs, "router_lm")  # per seed: FusionRoute minus each mode
    assert "| `finetuned` | 77.5 ± 10.6 | 77.5 ± 10.6 | 77.5 ± 10.6 | 77.5 ± 10.6 |" in claim
    row = next(x for x in claim.splitlines() if x.startswith("| FusionRoute − `finetuned`"))
    assert "-57.5 ± 10.6 (0/2 above)" in row.split(" | ")[4]  # mixed: 20 against 70 / 85
    A.scale_plot(s, str(tmp_path / "scale.png"))
    assert (tmp_path / "scale.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Without baselines among the modes there is no margin (the ablation's own table).
    plain = A.summarise(_config(variants=("router_lm",), seeds=(0, 1)),
                        {"router_lm": runs["router_lm"]})
    assert "margin" not in plain["variants"]["router_lm"]
