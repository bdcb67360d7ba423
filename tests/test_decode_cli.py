"""`python -m fr_jax.decode` end to end on tiny checkpoints written by the test."""

import json
import shutil

import pytest

from fr_jax.decode import main
from fr_jax.toy.tiny import build_tokenizer, ensure_tiny_world


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return ensure_tiny_world(str(tmp_path_factory.mktemp("world")), n_experts=2)


def _args(world, *extra):
    return [f"--config.router.path={world['router']}",
            f"--config.experts.paths=({world['experts'][0]!r}, {world['experts'][1]!r})",
            "--config.experts.names=('math', 'code')",
            "--config.decode.max_new_tokens=6", "--config.decode.chunk=4", *extra]


def test_cli_writes_jsonl_and_html_trace(world, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "What is 2 plus 2?"}\n\n{"prompt": "def f(x):"}\n')
    out, page = tmp_path / "out.jsonl", tmp_path / "trace.html"
    res = main(_args(world, f"--prompts_file={prompts}", f"--output={out}",
                     f"--trace_html={page}"))
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in records] == ["What is 2 plus 2?", "def f(x):"]
    for row, r in enumerate(records):
        ids, chosen = res.row(row)
        assert r["token_ids"] == ids and r["experts"] == chosen and r["mode"] == "fusionroute"
        assert set(chosen) <= {0, 1} and len(ids) == len(chosen) > 0
    html = page.read_text()
    assert html.startswith("<!doctype html>") and "math" in html and 'class="tok"' in html
    printed = capsys.readouterr().out
    assert "tokens per expert:" in printed and "[math]" in printed or "[code]" in printed


@pytest.mark.parametrize("mode", ["expert_only", "router_only", "expert:1", "mixture",
                                  "sequence:head"])
def test_cli_every_mode(world, mode):
    res = main(_args(world, f"--mode={mode}", "--prompt=hi"))
    _, chosen = res.row(0)
    expected = {"router_only": {-1}, "expert:1": {1}}.get(mode)
    assert expected is None or set(chosen) == expected
    if mode == "sequence:head":  # one expert for the whole answer
        assert len(set(chosen)) == 1


def test_cli_default_decodes_the_bundled_world(tmp_path, capsys):
    """No checkpoints given: the trained toy world in the package answers its prompts."""
    out = tmp_path / "out.jsonl"
    main([f"--output={out}"])
    printed = capsys.readouterr().out
    assert "tokens per expert:" in printed and "[math]" in printed
    texts = {r["prompt"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert texts["add 37+8"]["text"] == "45"
    assert texts["rev kqzt"]["text"] == "tzqk"
    assert set(texts["add 37+8"]["experts"]) == {0}  # math tokens from the math expert


@pytest.mark.parametrize("mode", ["sequence", "merged", "finetuned"])
def test_cli_baseline_modes_default_to_the_bundled_world(mode, tmp_path):
    """`sequence` uses the bundled SharedTrunkNet on the bundled router's activations;
    `merged` / `finetuned` decode the bundled stand-alone models."""
    out = tmp_path / "out.jsonl"
    res = main([f"--mode={mode}", f"--output={out}", "--config.decode.max_new_tokens=12"])
    records = {r["prompt"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert res.lengths.min() > 0 and all(r["mode"] == mode for r in records.values())
    if mode == "sequence":  # single-skill prompts: an expert alone or FusionRoute gets them
        assert records["add 37+8"]["text"] == "45" and records["rev kqzt"]["text"] == "tzqk"
    else:
        assert set(res.chosen[res.chosen >= 0].tolist()) == {0}


def test_cli_baseline_modes_name_what_is_missing(tmp_path):
    with pytest.raises(SystemExit, match="mode 'merged': no model at '/no/merged'.*fr_jax.merge"):
        main(["--mode=merged", "--config.baselines.merged=/no/merged"])
    with pytest.raises(SystemExit, match="no SharedTrunkNet at '/no/trunk'.*fr_jax.seqroute"):
        main(["--mode=sequence", "--config.seqroute.path=/no/trunk"])


def test_cli_missing_checkpoint(world):
    with pytest.raises(SystemExit, match="checkpoint folder '/no/such/router' does not exist"):
        main(["--config.router.path=/no/such/router", *_args(world)[1:]])


def test_cli_tokenizer_mismatch(world, tmp_path):
    other = tmp_path / "other_expert"
    shutil.copytree(world["experts"][1], other)
    for f in other.glob("tokenizer*"):
        f.unlink()
    build_tokenizer(vocab_size=300).save_pretrained(str(other))
    args = _args(world)
    args[1] = f"--config.experts.paths=({world['experts'][0]!r}, {str(other)!r})"
    with pytest.raises(SystemExit, match=r"tokenizer mismatch: .*other_expert.*differs from .*router"):
        main(args)


def test_cli_prompt_longer_than_cache(world):
    with pytest.raises(SystemExit, match="prompt 0 has .* tokens but the cache .*truncate_prompt"):
        main(_args(world, "--config.decode.cache_len=12", "--prompt=" + "word " * 40))
    res = main(_args(world, "--config.decode.cache_len=12", "--config.decode.truncate_prompt=True",
                     "--prompt=" + "word " * 40))
    assert res.prompt_lengths[0] == 12 - 8  # cache_len - (6 - 1 fed-back tokens, in chunks of 4)


def test_cli_unknown_mode(world):
    with pytest.raises(SystemExit, match="unknown decode mode 'best'.*fusionroute"):
        main(_args(world, "--mode=best"))
