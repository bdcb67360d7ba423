"""README.md and docs/ cannot go stale: every code block in them is executed or validated.

A block is fenced with its language; an HTML comment on the line before it says what this
test does with it (docs/development.md, "Documentation that runs"):
- ```bash, no comment: every `python -m fr_jax.<command>` in it runs here on the bundled toy
  world, with tiny overrides appended (TINY: few steps, outputs in a temporary folder);
- ```bash after `<!-- doc-test: run-by: tests/FILE.py::TEST -->`: that test runs the same
  command lines (with its own overrides and the assertions of its own), so it is not run twice:
  the test must exist, not be skipped, and invoke each command with each flag the block gives;
- ```bash after `<!-- doc-test: check: REASON -->` (real checkpoints, the hub, a TPU, hours):
  every command line is parsed as its command would parse it -- flags, config fields, their
  types and ranges, the config file -- and scripts, test files and extras named exist;
- ```python, no comment: run in a fresh interpreter, /ckpt/<name> replaced by the bundled
  world's folders; with `check`: compiled, its fr_jax imports resolved;
- ```text after `<!-- doc-test: output -->`: what the bash block just above prints, run
  here and compared (the timing and the mesh line aside); after `<!-- doc-test: example:
  REASON -->`: shown as an example, not compared.
Every file a doc cites exists, and every link and anchor resolves.
"""

import ast
import dataclasses
import glob
import importlib
import json
import os
import re
import shlex
import subprocess
import sys
from typing import List, Optional

import pytest

from cli_env import REPO, one_device_env

DOCS = ["README.md"] + sorted(os.path.relpath(p, REPO) for p in glob.glob(
    os.path.join(REPO, "docs", "*.md"))) + ["launch/README.md"]
# A fence may be indented (inside a list item), its directive too.
FENCE = re.compile(r"(?:^[ ]*<!-- doc-test: (?P<kind>[\w-]+)(?:: (?P<reason>[^\n]*?))? -->\n)?"
                   r"^(?P<indent>[ ]*)```(?P<lang>[^\n]*)\n(?P<body>.*?)^(?P=indent)```$",
                   re.S | re.M)
LANGS = ("bash", "python", "text")


@dataclasses.dataclass
class Block:
    doc: str
    line: int
    lang: str
    kind: Optional[str]  # None (run) | run-by | check | output | example
    reason: str
    body: str

    @property
    def id(self):
        return f"{self.doc}:{self.line}"


def _blocks() -> List[Block]:
    out = []
    for doc in DOCS:
        text = open(os.path.join(REPO, doc)).read()
        for m in FENCE.finditer(text):
            body = "\n".join(line[len(m["indent"]):] for line in m["body"].splitlines())
            out.append(Block(doc, text[:m.start("lang")].count("\n") + 1, m["lang"].strip(),
                             m["kind"], m["reason"] or "", body))
    return out


BLOCKS = _blocks()


def commands(block: Block) -> List[List[str]]:
    """The command lines of a bash block, continuations joined, comments dropped, each
    `a && b` split into its commands."""
    out = []
    for line in block.body.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        while words:
            cut = words.index("&&") if "&&" in words else len(words)
            out.append(words[:cut])
            words = words[cut + 1:]
    return out


# --------------------------------------------------------------------- form
def test_every_code_block_is_fenced_with_a_language_and_what_the_test_does_with_it():
    assert len(BLOCKS) > 30 and len(DOCS) >= 12
    for b in BLOCKS:
        assert b.lang in LANGS, f"{b.id}: fence a block with one of {LANGS}, not {b.lang!r}"
        assert b.kind in (None, "run-by", "check", "output", "example"), f"{b.id}: {b.kind}"
        if b.lang == "text":
            assert b.kind in ("output", "example"), f"{b.id}: a text block is output or example"
        if b.kind in ("check", "example", "run-by"):
            assert b.reason, f"{b.id}: say why it is not run or compared"
        if b.kind == "output":
            before = [x for x in BLOCKS if x.doc == b.doc and x.line < b.line][-1]
            assert before.lang == "bash" and before.kind is None and len(commands(before)) == 1
    for doc in DOCS:  # no indented code block (the test would not see it)
        outside = FENCE.sub("", open(os.path.join(REPO, doc)).read())
        for line in outside.splitlines():
            assert not re.match(r" {4}(python|pip|\.ci|tensorboard|launch/)", line), (doc, line)


def test_readme_is_short_and_has_exactly_the_two_set_up_commands():
    readme = open(os.path.join(REPO, "README.md")).read()
    assert len(readme.encode()) <= 10 * 1024
    setup = [b.body.strip() for b in BLOCKS if b.doc == "README.md" and b.lang == "bash"
             and b.body.startswith("pip install") and "[tensorboard]" not in b.body]
    assert setup == ["pip install -e . && python -m fr_jax.demo",
                     'pip install --no-compile -e ".[test]" && python -m pytest -q tests']
    for doc in DOCS[1:]:
        assert f"({doc[len('docs/'):]})" in readme or f"({doc})" in readme, f"README links {doc}"


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def test_every_cited_file_link_and_anchor_exists():
    tracked = set(subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True,
                                 text=True, check=True).stdout.split())
    for doc in DOCS + ["launch/README.md"]:
        text = open(os.path.join(REPO, doc)).read()
        for path in re.findall(r"`((?:fr_jax|configs|tests|benchmarks|launch|docs)/[\w./-]*\w)",
                               text):
            assert path in tracked or any(t.startswith(path.rstrip("/") + "/") for t in tracked), \
                f"{doc} cites {path}, which is not in the repository"
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"https?://", target):
                continue
            file, _, anchor = target.partition("#")
            where = os.path.normpath(os.path.join(os.path.dirname(doc), file)) if file else doc
            assert os.path.exists(os.path.join(REPO, where)), f"{doc} links {target}"
            if anchor and where.endswith(".md"):
                headings = re.findall(r"^#+ (.*)$", open(os.path.join(REPO, where)).read(), re.M)
                assert anchor in {_slug(h) for h in headings}, f"{doc} links {target}"


# --------------------------------------------------------------------- check
def _module(name: str):
    return importlib.import_module("fr_jax." + name)


def validate(words: List[str]):
    """Parses one documented command line as the command itself would, or checks that what
    it names exists."""
    from fr_jax import cli
    from fr_jax.config import check_ranges, default_config_file

    while words and re.match(r"^[A-Z_]+=", words[0]):  # VAR=value python -m ...
        words = words[1:]
    if words[:2] == ["python", "-m"] and words[2].startswith("fr_jax."):
        name, args = words[2][len("fr_jax."):], words[3:]
        tail = args[args.index("--") + 1:] if "--" in args else []
        args = args[:args.index("--")] if "--" in args else args
        args = [a for a in args if a not in cli.HELP]
        command = _module(name).COMMAND
        fv = cli.parse_flags([f"fr_jax.{name}"] + args,
                             default_config_file(command.config_file), command.flags)
        cli.apply_shortcuts(fv.config, fv, command.flags)
        check_ranges(fv.config)
        if tail:  # fr_jax.launch's command
            validate(tail)
    elif words[:3] == ["python", "-m", "pytest"]:
        for path in (w.split("::")[0] for w in words[3:] if w.startswith("tests")):
            assert os.path.exists(os.path.join(REPO, path)), path
    elif words[0] == "python" and words[1].endswith(".py"):
        source = open(os.path.join(REPO, words[1])).read()
        for flag in (w.split("=")[0] for w in words[2:] if w.startswith("--")):
            assert f'"{flag}"' in source, f"{words[1]} defines no {flag}"
    elif words[:2] == ["pip", "install"]:
        setup = open(os.path.join(REPO, "setup.py")).read()
        for extra in re.findall(r"\.\[([\w,]+)\]", " ".join(words)):
            for e in extra.split(","):
                assert f'"{e}": requirements(' in setup, f"no extra {e!r} in setup.py"
    elif words[0] == "curl":  # a request to `python -m fr_jax.serve`, at its default address
        from fr_jax.serving.protocol import FIELDS

        url = next(w for w in words if w.startswith("http"))
        assert url.startswith("http://127.0.0.1:8000/"), url
        path = url[len("http://127.0.0.1:8000"):]
        assert path in ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health",
                        "/metrics"), path
        if "-d" in words:
            kind = "chat.completion" if "chat" in path else "text_completion"
            body = json.loads(words[words.index("-d") + 1])
            assert set(body) <= set(FIELDS[kind]), set(body) - set(FIELDS[kind])
    elif words[0] == "tensorboard":
        assert '"tensorboard": requirements(' in open(os.path.join(REPO, "setup.py")).read()
    elif words[0] == ".ci/run" or words[0].startswith("launch/"):
        assert os.access(os.path.join(REPO, words[0]), os.X_OK), f"{words[0]} is not executable"
        if "--" in words:  # launch/tpu_vm.sh's command for every worker
            validate(words[words.index("--") + 1:])
    else:
        raise AssertionError(f"no rule to check {' '.join(words)!r}: add one to tests/test_docs.py")


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.lang == "bash"], ids=lambda b: b.id)
def test_every_documented_command_line_parses(block, monkeypatch):
    monkeypatch.chdir(REPO)  # config files are named relative to the checkout
    for words in commands(block):
        try:
            validate(words)
        except SystemExit as e:
            raise AssertionError(f"{block.id}: {' '.join(words)}: {e}") from None


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.lang == "python"], ids=lambda b: b.id)
def test_every_python_block_compiles_and_imports_what_exists(block):
    tree = ast.parse(block.body, block.id)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module.startswith("fr_jax"):
            module = importlib.import_module(node.module)
            for alias in node.names:
                assert hasattr(module, alias.name), f"{block.id}: {node.module}.{alias.name}"


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.kind == "run-by"], ids=lambda b: b.id)
def test_a_block_run_by_another_test_is_what_that_test_runs(block):
    path, _, name = block.reason.partition("::")
    source = open(os.path.join(REPO, path)).read()
    tests = {n.name: n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.FunctionDef)}
    assert name in tests, f"{block.id}: {path} has no {name}"
    marks = [ast.unparse(d) for d in tests[name].decorator_list]
    assert not any("skip" in m or "xfail" in m for m in marks), f"{block.id}: {name} {marks}"
    for words in commands(block):
        assert words[:2] == ["python", "-m"], words
        module = _module(words[2][len("fr_jax."):]).__name__
        assert f'"{words[2]}"' in source or f"from {module} import main" in source, (
            f"{block.id}: {path} does not run {words[2]}")
        for flag in (w.split("=")[0] for w in words[3:] if w.startswith("--")):
            assert f'"{flag}=' in source or f"'{flag}=" in source or f'"{flag}"' in source, (
                f"{block.id}: {path} runs {words[2]} without {flag}")


# --------------------------------------------------------------------- run
# Appended to each documented command line that runs here: a few steps, small subsets, every
# output under the test's folder ({tmp}).
TINY = {
    "train": ["--config.train.workdir={tmp}/train", "--config.train.sft.steps=2",
              "--config.train.cdpo.steps=2", "--config.train.eval_every=0",
              "--config.train.ckpt_every=2"],
    "merge": ["--out={tmp}/merged"],
}


def _run(words, tmp, home, tiny=True):
    if words[0] == "launch/tpu_vm.sh":  # only its dry run, which starts nothing
        assert "--dry-run" in words and any(w.startswith("--slice=") for w in words), words
        out = subprocess.run(["bash", *words], cwd=REPO, env=one_device_env(home),
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, f"{' '.join(words)}:\n{out.stderr[-3000:]}"
        return out.stdout
    name = words[2][len("fr_jax."):]
    assert name in TINY or not tiny, (f"{' '.join(words)}: add its tiny overrides to TINY, or "
                                      "mark the block")
    argv = [sys.executable, *words[1:]] + ([a.format(tmp=tmp) for a in TINY[name]] if tiny
                                           else [])
    out = subprocess.run(argv, cwd=REPO, env=one_device_env(home), capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, f"{' '.join(words)}:\n{out.stderr[-3000:]}"
    return out.stdout


def _normalise(trace: str) -> str:
    """A trace without what differs between machines: the mesh and the timing."""
    trace = re.sub(r"; mesh \{.*\} on \w+", "; mesh ... on ...", trace)
    return re.sub(r" — \d+ tokens in .*$", " — ...", trace, flags=re.M).strip()


@pytest.mark.slow
@pytest.mark.parametrize("block", [b for b in BLOCKS if b.lang == "bash" and b.kind is None],
                         ids=lambda b: b.id)
def test_every_runnable_command_line_runs(block, tmp_path):
    shown = [b for b in BLOCKS if b.doc == block.doc and b.line > block.line][:1]
    compare = shown and shown[0].kind == "output"
    for words in commands(block):
        assert words[:2] == ["python", "-m"] and words[2].startswith("fr_jax.") or (
            words[0] == "launch/tpu_vm.sh"), f"{block.id}: {words}: mark the block `check`"
        stdout = _run(words, tmp_path, tmp_path / "home", tiny=not compare)
        if compare:  # the doc shows this output: exactly it, as written
            assert _normalise(stdout) == _normalise(shown[0].body), (
                f"{block.id}: the output shown differs from what the command prints now; "
                f"replace it with:\n{stdout}")


CKPT = re.compile(r"/ckpt/(router|math|code|instr)\b")


@pytest.mark.slow
@pytest.mark.parametrize("block", [b for b in BLOCKS if b.lang == "python" and b.kind is None],
                         ids=lambda b: b.id)
def test_every_runnable_python_block_runs_on_the_bundled_world(block, tmp_path):
    from fr_jax.runtime.bundle import bundled_world

    world = bundled_world()
    folders = dict(zip(world["names"], world["experts"]), router=world["router"])
    source = CKPT.sub(lambda m: folders[m[1]], block.body)
    assert "/ckpt/" not in source, f"{block.id}: only /ckpt/{{{', '.join(folders)}}} are known"
    out = subprocess.run([sys.executable, "-c", source], cwd=tmp_path,
                         env=one_device_env(tmp_path / "home"), capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, f"{block.id}:\n{out.stderr[-3000:]}"
