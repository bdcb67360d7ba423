"""Inputs and outputs a command cannot use, met as a user meets them (issue 31): the real
command lines, in this process, on real files. Each fails before any work, in one line
naming the problem and the fix, and writes (or loses) nothing."""

import os

import pytest

from fr_jax.runtime.bundle import bundled_world

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(REPO, "configs", "data", "three_domains.py")
TINY = os.path.join(REPO, "configs", "tiny.py")


def _fails(main, argv) -> str:
    """The one-line error `main(argv)` exits with."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    message = str(e.value)
    assert message.startswith("error: ") and "\n" not in message, message
    return message


def _snapshot(root):
    """Every path under `root` with its bytes (None for a folder): what "nothing written,
    nothing lost" compares."""
    out = {}
    for d, dirs, files in os.walk(root):
        out.update({os.path.join(d, x): None for x in dirs})
        for x in files:
            with open(os.path.join(d, x), "rb") as f:
                out[os.path.join(d, x)] = f.read()
    return out


def _place(tmp_path, case: str, name: str):
    """(a path to write to that cannot be written, the message's tail) for `case`: an
    existing folder, a path under a regular file, or a file in a folder that takes none."""
    if case == "folder":
        folder = tmp_path / name
        folder.mkdir()
        (folder / "kept.txt").write_text("a user's file\n")
        return str(folder), " is an existing folder, not a file; choose another file name"
    if case == "under_file":
        (tmp_path / "plain").write_text("a file, not a folder\n")
        return (str(tmp_path / "plain" / name),
                f": {str(tmp_path / 'plain')!r} is a file, not a folder; choose another path")
    # /proc takes no new files, whoever asks (a chmod'ed folder stays writable for root)
    return (os.path.join("/proc", name),
            ": folder '/proc' is not writable; choose a folder you can write to")


CASES = ("folder", "under_file", "read_only")


# ------------------------------------------------------------------ 1. data.sft / data.pairs
@pytest.mark.parametrize("case", CASES)
def test_sft_refuses_an_output_it_cannot_write_before_reading_any_data(tmp_path, case):
    from fr_jax.data.sft import main
    out, tail = _place(tmp_path, case, "mix.jsonl")
    before = _snapshot(tmp_path)
    # The recipe's sources are hub names: reaching them would fail differently (offline).
    message = _fails(main, [f"--config={RECIPE}", f"--output={out}"])
    assert message == f"error: --config.output {out!r}{tail}"
    assert _snapshot(tmp_path) == before


def test_sft_refuses_a_manifest_path_taken_by_a_folder(tmp_path):
    from fr_jax.data.sft import main
    (tmp_path / "mix.manifest.json").mkdir()
    message = _fails(main, [f"--config={RECIPE}", f"--output={tmp_path / 'mix.jsonl'}"])
    assert message == (f"error: --config.output's manifest "
                       f"{str(tmp_path / 'mix.manifest.json')!r} is an existing folder, not a "
                       "file; choose another file name")
    assert sorted(os.listdir(tmp_path)) == ["mix.manifest.json"]


@pytest.mark.parametrize("argv, message", [
    (lambda t: [f"--output={t / 'taken'}"],
     lambda t: f"pairs.output {str(t / 'taken')!r} is an existing folder, not a file; choose "
               "another file name"),
    (lambda t: [f"--output={t / 'p.jsonl'}", f"--workdir={t / 'plain'}"],
     lambda t: f"pairs.workdir {str(t / 'plain')!r} is an existing file, not a folder; "
               "choose another path"),
    (lambda t: [f"--output={t / 'p.jsonl'}", f"--workdir={t / 'w'}",
                f"--config.pairs.sources.toy.path={t / 'no_pool.jsonl'}"],
     lambda t: f"--config.pairs.sources.toy.path={str(t / 'no_pool.jsonl')!r} does not "
               "exist; point it at the training prompts (records in toy's format: domain, "
               "prompt; JSONL, JSON, Parquet or a saved datasets folder)"),
], ids=["output_is_a_folder", "workdir_is_a_file", "missing_source"])
def test_pairs_refuses_bad_paths_before_loading_a_model(tmp_path, argv, message):
    from fr_jax.data.pairs import main
    (tmp_path / "taken").mkdir()
    (tmp_path / "plain").write_text("a file\n")
    before = _snapshot(tmp_path)
    assert _fails(main, argv(tmp_path)) == "error: " + message(tmp_path)
    assert _snapshot(tmp_path) == before


# ------------------------------------------------------------------ 2. decode's outputs
@pytest.mark.parametrize("flag", ["output", "trace_html"])
@pytest.mark.parametrize("case", CASES + ("missing_parent",))
def test_decode_refuses_an_output_it_cannot_write_before_loading_a_model(tmp_path, capsys,
                                                                          flag, case):
    from fr_jax.decode import main
    if case == "missing_parent":
        out = str(tmp_path / "no_such_folder" / "out")
        tail = (f": folder {str(tmp_path / 'no_such_folder')!r} does not exist; create it "
                "first or choose another path")
    else:
        out, tail = _place(tmp_path, case, "out")
    before = _snapshot(tmp_path)
    message = _fails(main, [f"--{flag}={out}"])
    assert message == f"error: decode.{flag} {out!r}{tail}"
    assert _snapshot(tmp_path) == before
    assert "mode fusionroute" not in capsys.readouterr().out  # no model was loaded


# ------------------------------------------------------------------ 3. missing data files
@pytest.mark.parametrize("stage, argv, message", [
    ("sft", [], "no training data: --config.data.sft_path is not set; point it at the SFT "
                "examples (prompt, response): JSONL, JSON, Parquet or a folder saved with "
                "datasets"),
    ("cdpo", ["--config.data.pref_path={missing}"],
     "--config.data.pref_path={missing!r} does not exist; point it at the preference pairs "
     "(prompt, chosen, rejected): JSONL, JSON, Parquet or a folder saved with datasets"),
])
def test_training_names_the_data_field_that_is_missing(tmp_path, stage, argv, message):
    from fr_jax.train import main
    world = bundled_world()
    missing = str(tmp_path / "pairs.jsonl")
    args = [a.format(missing=missing) for a in argv]
    got = _fails(main, [f"--config={TINY}", f"--config.router.path={world['router_base']}",
                        f"--config.experts.paths={tuple(world['experts'])!r}",
                        f"--config.train.workdir={tmp_path / 'run'}",
                        f"--config.train.stages=('{stage}',)", *args])
    assert got == "error: " + message.format(missing=missing)
    assert not (tmp_path / "run").exists()  # checked before the workdir is touched


# ------------------------------------------------------------------ 4. the demo's settings
@pytest.mark.parametrize("argv, message", [
    (["--config.train.seed=-1"], "--config.train.seed=-1 is out of range: a seed is an integer "
                                 "in [0, 4294967295]"),
    (["--config.world.seed=99999999999"], "--config.world.seed=99999999999 is out of range: "
                                          "a seed is an integer in [0, 4294967295]"),
    (["--config.world.n_test=0"], "--config.world.n_test=0 is out of range: it must be a "
                                  "finite number in [1, inf)"),
    (["--config.train.sft.lr=0"], "--config.train.sft.lr=0.0 is out of range: it must be a "
                                  "finite number in (0, inf)"),
    (["--config.pairs.samples=-2"], "--config.pairs.samples=-2 is out of range: it must be a "
                                    "finite number in [0, inf)"),
    (["--config.world.expert_own=1.5"], "--config.world.expert_own=1.5 is out of range: it "
                                        "must be a finite number in [0, 1]"),
    (["--config.demo.experts.steps_by_domain.math=0"],
     "--config.demo.experts.steps_by_domain.math=0 is out of range: it must be a finite number "
     "in [1, inf)"),
    (["--config.demo.router_model.num_kv_heads=3"],
     "--config.demo.router_model: num_heads (4) must be a multiple of num_kv_heads (3)"),
    (["--config.train.sft.lm_target=fussed"],
     "--config.train.sft.lm_target='fussed' is not one of 'router', 'fused', 'mix'"),
    (["--config.pairs.sources.toy.limit=-1"],
     "--config.pairs.sources.toy.limit=-1: the number of training prompts sampled for pairs "
     "is an integer, 0 (all) or more"),
    (["--config.demo.baselines=False"],
     "demo.baselines=False trains no baseline model, but eval.modes has sequence, merged:ta, "
     "merged:ties, finetuned; drop those or leave demo.baselines=True"),
    (["--config.eval.modes=('fusionroute','merged')"],
     "--config.eval.modes: the demo trains no model 'merged'; its baselines are merged:ta, "
     "merged:ties, finetuned"),
], ids=["seed", "world_seed", "n_test", "lr", "samples", "own", "steps_by_domain", "heads",
        "lm_target", "pairs_limit", "baselines", "mode"])
def test_demo_checks_every_setting_before_it_writes_anything(tmp_path, argv, message):
    from fr_jax.demo import main
    workdir = tmp_path / "demo"
    assert _fails(main, [f"--config.train.workdir={workdir}", *argv]) == "error: " + message
    assert not workdir.exists()


def test_demo_refuses_a_workdir_it_cannot_make(tmp_path):
    from fr_jax.demo import main
    (tmp_path / "plain").write_text("a file\n")
    workdir = tmp_path / "plain" / "demo"
    assert _fails(main, [f"--config.train.workdir={workdir}"]) == (
        f"error: --config.train.workdir {str(workdir)!r}: {str(tmp_path / 'plain')!r} is a file, not "
        "a folder; choose another path")
    assert (tmp_path / "plain").read_text() == "a file\n"


# ------------------------------------------------------------------ 5. prompts files
def test_an_empty_prompt_is_named_by_file_and_line_and_blank_lines_are_skipped(tmp_path,
                                                                                 capsys):
    from fr_jax.corpus import prompt_lines
    from fr_jax.decode import main
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "What is 2 plus 3?"}\n\n   \n{"prompt": "def f(x):"}\n\n')
    assert prompt_lines(str(path)) == [(f"{path}:1", "What is 2 plus 3?"),
                                       (f"{path}:4", "def f(x):")]
    path.write_text('{"prompt": "What is 2 plus 3?"}\n\n{"prompt": "  "}\n')
    out = tmp_path / "out.jsonl"
    assert _fails(main, [f"--prompts_file={path}", f"--output={out}"]) == (
        f"error: {path}:3: the prompt is empty; write one or delete the line (blank lines are "
        "skipped)")
    assert _fails(main, ["--prompt=What is 2 plus 3?", "--prompt="]) == (
        "error: --prompt number 2 is empty; give it some text or leave it out")
    assert not out.exists() and "mode fusionroute" not in capsys.readouterr().out
