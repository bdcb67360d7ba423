"""`python -m fr_jax.seqroute` end to end on the bundled toy world: labels (cached), probes,
SharedTrunkNet, the lam sweep; then decode mode `sequence` with the net it wrote."""

import json
import os

import pytest

from fr_jax.harness import toy_world as W


def _train(root):
    from fr_jax.seqroute import main

    data = W.make_world_data(300, 10, seed=5)
    tasks = [t for d in W.EVAL_DOMAINS for t in data.train[d][:40]]
    labelled = root / "labelled.jsonl"
    W.write_jsonl(str(labelled), [{"prompt": t.prompt, "answer": t.answer, "domain": t.domain}
                                  for t in tasks])
    args = [f"--config.seqroute.data={labelled}", f"--config.seqroute.workdir={root / 'run'}",
            "--config.seqroute.max_new_tokens=16", "--config.seqroute.trunk.steps=200",
            "--config.seqroute.trunk.hidden=(32,)", "--config.seqroute.lams=(0.0, 0.5)"]
    report = main(args)
    return root, args, report


@pytest.mark.slow
def test_cli_writes_probes_trunk_and_report_and_a_rerun_reuses_them(tmp_path):
    """One training run (labels, probes, the trunk, the sweep), then a re-run that decodes
    nothing again, then decode mode `sequence` with the net it wrote."""
    root, args, report = _train(tmp_path)
    _writes_probes_trunk_and_report(root)
    _rerun_reuses_the_labels_and_decodes_with_the_trained_net(root, args, report, tmp_path)


def _writes_probes_trunk_and_report(root):
    run = root / "run"
    for name in ("probes.json", "probes.md", "probes.png", "report.json", "report.md",
                 "sweep.png", "trunk/seqroute.json", "trunk/trunk.json"):
        assert (run / name).stat().st_size > 0, name
    saved = json.load(open(run / "report.json"))
    assert saved["targets"] == ["expert:0", "expert:1", "expert:2", "fusionroute"]
    assert 0 <= saved["layer"] < 3 and saved["n_train"] + saved["n_test"] == 160
    assert [r["lam"] for r in saved["sweep"]] == [0.0, 0.5]
    # FusionRoute reads the router and (lazy experts, decode's default) the selected expert
    # with its catch-up passes, counted on the labelled answers' routing: the most expensive
    # target, yet below the three experts together (the eager schedule reads the router and
    # all three every token); lam 0.5 saves cost.
    assert saved["cost_schedule"] == "lazy" and max(saved["costs"]) == saved["costs"][3]
    assert saved["costs"][3] < sum(saved["costs"][:3])
    fused = [json.loads(line) for line in open(run / "labels" / "fusionroute.jsonl")]
    assert all(len(r["chosen"]) > 0 for r in fused)  # the routing is cached with the answers
    assert saved["sweep"][1]["cost_saving"] >= saved["sweep"][0]["cost_saving"]
    m = saved["metrics"]
    assert m["oracle"] >= m["best_single_accuracy"] and 0 <= m["accuracy"] <= 1
    # Labels are cached: one answer file per target, one line per prompt.
    for t in ("expert_0", "expert_1", "expert_2", "fusionroute"):
        assert len((run / "labels" / f"{t}.jsonl").read_text().splitlines()) == 160


def _rerun_reuses_the_labels_and_decodes_with_the_trained_net(root, args, report, tmp_path):
    from fr_jax.decode import main as decode
    from fr_jax.seqroute import main

    labels = root / "run" / "labels" / "fusionroute.jsonl"
    before = os.path.getmtime(labels)
    again = main(args)
    assert os.path.getmtime(labels) == before  # nothing decoded twice
    for key in ("accuracy", "oracle", "cost_saving", "routed_share"):
        assert again["metrics"][key] == report["metrics"][key], key
    out = tmp_path / "out.jsonl"
    res = decode(["--mode=sequence", f"--config.seqroute.path={root / 'run' / 'trunk'}",
                  f"--output={out}", "--config.decode.max_new_tokens=12"])
    assert res.lengths.min() > 0


def test_bad_labelled_file_is_a_clear_error(tmp_path):
    from fr_jax.seqroute import main

    with pytest.raises(SystemExit, match="labelled prompts '/no/file.jsonl' not found"):
        main(["--config.seqroute.data=/no/file.jsonl"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "add 1+2"}\n')
    with pytest.raises(SystemExit, match='bad.jsonl:1: expected string "prompt" and "answer"'):
        main([f"--config.seqroute.data={bad}"])
