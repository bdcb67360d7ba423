"""Every `python -m fr_jax.<command>` answers -h / --help with one screen and --helpfull with
every config field; a mistyped flag or field is one line with the closest names, status 2."""

import os
import re
import subprocess
import sys

import pytest

from fr_jax.cli import usage
from fr_jax.config import base_config, default_config_file
from cli_env import REPO

# Every command module (`python -m fr_jax.<name>`), found from the source, not listed by hand.
COMMANDS = sorted(
    os.path.relpath(os.path.join(root, f), REPO)[:-3].replace(os.sep, ".")
    for root, _, files in os.walk(os.path.join(REPO, "fr_jax")) for f in files
    if f.endswith(".py") and "COMMAND = cli.Command(" in open(os.path.join(root, f)).read())
NAMES = {}  # module -> command, where they differ
SCREEN = 60  # lines: one screen


def _run(*args):
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=REPO), timeout=120)


def test_the_commands_are_found():
    assert len(COMMANDS) >= 11 and "fr_jax.decode" in COMMANDS and "fr_jax.data.sft" in COMMANDS


def _main(module: str, argv, capsys):
    """(exit status, stdout, stderr) of the command's main(argv), in this process."""
    import importlib

    with pytest.raises(SystemExit) as e:
        importlib.import_module(module).main(argv)
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


@pytest.mark.parametrize("module", COMMANDS)
def test_help_is_one_screen_of_what_the_command_reads(module, capsys):
    import importlib

    command = importlib.import_module(module).COMMAND
    name = NAMES.get(module, module[len("fr_jax."):])
    code, stdout, stderr = _main(module, ["--help"], capsys)
    assert code == 0 and not stderr.strip(), stderr[-2000:]
    lines = stdout.splitlines()
    assert len(lines) <= SCREEN and max(map(len, lines)) <= usage.WIDTH, (len(lines), name)
    assert lines[0].startswith(f"usage: python -m fr_jax.{name} ")
    for flag in command.flags:
        assert f"  --{flag.name}=" in stdout, flag.name
    assert os.path.exists(os.path.join(REPO, command.doc)) and f"more: {command.doc}" in stdout
    # Every section the screen shows field by field has every field's value, and (base
    # config's sections) a description.
    docs = usage.field_docs(default_config_file(command.config_file))
    for section in command.sections:
        assert f"\n  {section}:" in stdout, section
    for field in usage.fields(base_config()):
        if field.split(".")[0] in command.sections and field.count(".") == 1:
            assert usage.describe(field, docs), f"{field} has no comment in fr_jax/config/base.py"
            leaf = field.split(".")[1]
            assert re.search(rf"\n    {leaf} = .*\S {{2,}}\S", stdout), field


def test_dash_h_and_a_config_s_own_values():
    """-h is --help; the screen shows the config the command line would run, overrides in."""
    out = _run("-m", "fr_jax.eval", "-h", "--config=configs/llama3.py", "--limit=7",
               "--config.eval.batch_size=3")
    assert out.returncode == 0, out.stderr
    assert "config file (now configs/llama3.py)" in out.stdout
    assert "    limit = 7 " in out.stdout and "    batch_size = 3 " in out.stdout
    assert "    path = '/ckpt/Llama-3.2-" in out.stdout  # the router, from configs/llama3.py


def test_helpfull_lists_every_field_with_its_description(capsys):
    from fr_jax.train import main

    with pytest.raises(SystemExit) as e:
        main(["--helpfull"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    config = base_config()
    for field in usage.fields(config):
        section, rest = field.split(".", 1)
        assert f"\n    {rest} = " in text, field
    assert "also in this config" not in text
    assert "lambda_lm in L_SFT = L_route + lambda_lm * L_lm" in text  # train.sft.lm_weight


@pytest.mark.parametrize("args,line", [
    (["fr_jax.decode", "--config.decode.mdoe=x"],
     "error: unknown config field decode.mdoe (did you mean decode.mode"),
    (["fr_jax.decode", "--promt=hi"], "error: unknown flag --promt (did you mean --prompt?)"),
    (["fr_jax.train", "--config.train.lr=1"],
     "error: unknown config field train.lr (did you mean train.lm.lr or train.sft.lr?)"),
    (["fr_jax.demo", "--config.train.sft.stpes=3"],
     "error: unknown config field train.sft.stpes (did you mean train.sft.steps or train.lm.steps?)"),
    (["fr_jax.plan", "--config=configs/nosuch.py"],
     "error: config file configs/nosuch.py does not exist (fr_jax's own, in configs/: "),
    (["fr_jax.merge", "stray"], "error: unexpected arguments stray"),
])
def test_a_mistyped_command_line_is_one_line_with_the_closest_names(args, line, capsys,
                                                                     monkeypatch):
    monkeypatch.chdir(REPO)
    code, stdout, stderr = _main(args[0], args[1:], capsys)
    assert code == 2, (code, stderr[-2000:])
    assert stderr.startswith(line) and len(stderr.strip().splitlines()) == 1, stderr
    assert not stdout.strip()


def test_a_mistyped_field_exits_with_status_2_from_the_command_line():
    out = _run("-m", "fr_jax.seqroute", "--config.seqroute.lamb=0.1")
    assert out.returncode == 2 and not out.stdout.strip()
    assert out.stderr.strip() == ("error: unknown config field seqroute.lamb (did you mean "
                                  "seqroute.lam or seqroute.lams?); --helpfull lists every field")


def test_the_fields_a_help_screen_describes_come_from_the_comments_beside_them(tmp_path):
    """The description parser: a comment on the line, else the comment block just above; a
    dict written whole shares its comment; a field of the same name elsewhere lends its own."""
    f = tmp_path / "c.py"
    f.write_text(
        "import ml_collections\n\n\ndef get_config():\n"
        "    c = ml_collections.ConfigDict()\n"
        "    # Knobs of the thing.\n"
        "    # Two lines of them.\n"
        "    c.knob = 1\n"
        "    c.other = 2  # the other one; with more after\n"
        "    c.mesh = ml_collections.ConfigDict(dict(a=1, b=2))  # per axis\n"
        "    c.bare = 3\n"
        "    return c\n")
    docs = usage.field_comments(str(f))
    assert docs["knob"] == "Knobs of the thing. Two lines of them."
    assert usage.one_line(docs["other"], 80) == "the other one"
    assert usage.describe("mesh.a", docs) == "per axis"
    assert "bare" not in docs
    assert usage.describe("cdpo.beta", usage.field_docs(str(f))).startswith("DPO's beta")


@pytest.mark.parametrize("args,line", [
    (["fr_jax.train", "--config.experts.paths=('/a', '/b', '/c')",
      "--config.experts.paths=('/c', '/d')"],
     "error: --config.experts.paths is given twice: give each field once (a tuple field takes "
     "all its items in one value, e.g. --config.experts.paths=/ckpt/a,/ckpt/b)"),
    (["fr_jax.decode", "--mode=expert_only", "--config.decode.mode=fusionroute"],
     "error: decode.mode is given twice (--mode and --config.decode.mode): give it once"),
    (["fr_jax.decode", "--prompt=a", "--prompt=b", "--config.decode.prompts=('c',)"],
     "error: decode.prompts is given twice (--prompt and --config.decode.prompts): give it "
     "once"),
    (["fr_jax.decode", "--config=configs/tiny.py", "--config=configs/llama3.py"],
     "error: --config is given twice: name one config file (override its fields with "
     "--config.FIELD=VALUE)"),
])
def test_a_field_given_twice_is_refused_not_appended(args, line, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    code, stdout, stderr = _main(args[0], args[1:], capsys)
    assert code == 2 and stderr.strip() == line, stderr


def test_a_repeatable_flag_repeats(capsys):
    from fr_jax import cli
    from fr_jax.decode import COMMAND

    fv = cli.parse_flags(["fr_jax.decode", "--prompt=a", "--prompt=b"],
                         default_config_file("tiny.py"), COMMAND.flags)
    cli.apply_shortcuts(fv.config, fv, COMMAND.flags)
    assert fv.config.decode.prompts == ("a", "b")


@pytest.mark.parametrize("source, line", [
    ("from fr_jax.config import base_config\n\ndef get_config():\n    c = base_config()\n"
     "    c.train.sft.steps = (\n    return c\n", ":5: '(' was never closed"),
    ("def get_config():\n    return {}['missing']\n", ":2: KeyError: 'missing'"),
    ("CONFIG = 1\n", " defines no get_config(): an ml_collections config file returns its "
                     "ConfigDict from get_config()"),
])
def test_a_broken_config_file_is_named_by_file_and_line(source, line, tmp_path, capsys):
    path = tmp_path / "mine.py"
    path.write_text(source)
    code, _, stderr = _main("fr_jax.train", [f"--config={path}"], capsys)
    assert code == 2 and stderr.strip() == f"error: config file {path}{line}", stderr


def test_a_tuple_field_takes_the_comma_form(tmp_path):
    from fr_jax import cli
    from fr_jax.decode import COMMAND

    fv = cli.parse_flags(["fr_jax.decode", "--config.experts.paths=/ckpt/math,/ckpt/code",
                          "--config.decode.eos_ids=1,2", "--config.experts.names=a"],
                         default_config_file("tiny.py"), COMMAND.flags)
    assert fv.config.experts.paths == ("/ckpt/math", "/ckpt/code")
    assert fv.config.decode.eos_ids == (1, 2)
    assert fv.config.experts.names == ("a",)
