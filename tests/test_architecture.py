"""The package's shape: its import graph has no cycle and no import of a higher floor from a
lower one, every import of fr_jax code sits at module level (none hides a cycle inside a
function), no module is over the size limit, and no two modules share a name."""

import ast
import collections
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fr_jax")

# The floors, lowest first: a module may import its own floor and the floors below it. Each
# floor lists whole packages; the top floor also holds the command modules directly in fr_jax/
# (COMMANDS: `python -m fr_jax.<command>`), and nothing else sits there.
COMMANDS = "fr_jax.<command>"
LAYERS = (
    ("foundations", ("fr_jax.runtime", "fr_jax.config")),
    ("models", ("fr_jax.models",)),
    ("checkpoints and tokenizers", ("fr_jax.hf",)),
    ("the method's parts", ("fr_jax.routing",)),
    ("inference", ("fr_jax.inference",)),
    ("serving", ("fr_jax.serving",)),
    ("training", ("fr_jax.corpus", "fr_jax.steps", "fr_jax.loop")),
    ("evaluation and baselines", ("fr_jax.harness", "fr_jax.baselines")),
    # The data engine decontaminates against the benchmarks and scores sampled answers.
    ("data engine", ("fr_jax.datagen",)),
    ("the toy world and the planner", ("fr_jax.toy", "fr_jax.aot")),
    ("commands", ("fr_jax.cli", "fr_jax.data", COMMANDS)),
)
MAX_LINES = 500


def _modules():
    """{module name: file path} for every .py file of the package."""
    out = {}
    for dirpath, _, files in os.walk(ROOT):
        for fn in files:
            if fn.endswith(".py"):
                path = os.path.join(dirpath, fn)
                rel = os.path.relpath(path, os.path.dirname(ROOT))[:-3].replace(os.sep, ".")
                out[rel[:-len(".__init__")] if rel.endswith(".__init__") else rel] = path
    return out


def _resolve(name, modules):
    """The module a dotted import target lives in (`fr_jax.a.b.Name` -> `fr_jax.a.b`)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module, path, modules):
    """[(imported module, line, at module level)] of every fr_jax import in the file."""
    tree = ast.parse(open(path).read(), path)
    is_pkg = path.endswith("__init__.py")
    out = []

    def visit(node, top):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                targets = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    pkg = module.split(".") if is_pkg else module.split(".")[:-1]
                    pkg = pkg[:len(pkg) - child.level + 1]
                    base = ".".join(pkg + ([base] if base else []))
                targets = [f"{base}.{a.name}" for a in child.names]
            else:
                inner = top and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                       ast.Lambda))
                visit(child, inner)
                continue
            for t in targets:
                if t.split(".")[0] == "fr_jax":
                    target = _resolve(t, modules)
                    if target and target != module:
                        out.append((target, child.lineno, top))

    visit(tree, True)
    return out


def _is_command_module(module):
    """A module file directly in fr_jax/ (not a package)."""
    return (module.count(".") == 1 and
            os.path.isfile(os.path.join(ROOT, module.split(".")[1] + ".py")))


def _layer(module):
    for i, (_, packages) in enumerate(LAYERS):
        for p in packages:
            if module == p or module.startswith(p + ".") or (
                    p == COMMANDS and _is_command_module(module)):
                return i
    return None


@pytest.fixture(scope="module")
def graph():
    modules = _modules()
    return modules, {m: _imports(m, p, modules) for m, p in modules.items()}


def test_every_module_has_a_floor(graph):
    modules, _ = graph
    assert [m for m in modules if m != "fr_jax" and _layer(m) is None] == []


def test_floors_name_whole_packages_each_once():
    """A folder sits on one floor: LAYERS names top-level packages only, each once, and
    every package of fr_jax is among them."""
    named = [p for _, packages in LAYERS for p in packages if p != COMMANDS]
    packages = sorted(f"fr_jax.{d}" for d in os.listdir(ROOT)
                      if os.path.isfile(os.path.join(ROOT, d, "__init__.py")))
    assert sorted(named) == packages


def test_the_top_level_is_the_list_of_commands(graph):
    """Every module file directly in fr_jax/ is a command (`python -m fr_jax.<name>`: a
    module-level COMMAND and main()), named as its COMMAND says; the library lives in
    packages."""
    modules, _ = graph
    not_commands = []
    for m, p in modules.items():
        if not (_is_command_module(m) or m.startswith("fr_jax.data.")):
            continue
        tree = ast.parse(open(p).read(), p)
        assigned = {t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets
                    if isinstance(t, ast.Name)}
        functions = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
        if "COMMAND" not in assigned or "main" not in functions:
            not_commands.append(m)
    assert not_commands == []


def test_no_import_of_a_higher_floor(graph):
    _, edges = graph
    upward = [f"{m} (floor '{LAYERS[_layer(m)][0]}') imports {t} (floor "
              f"'{LAYERS[_layer(t)][0]}') at line {line}"
              for m, imps in edges.items() if m != "fr_jax"
              for t, line, _ in imps if t != "fr_jax" and _layer(t) > _layer(m)]
    assert upward == []


def test_fr_jax_imports_sit_at_module_level(graph):
    _, edges = graph
    local = [f"{m} imports {t} inside a function (line {line})"
             for m, imps in edges.items() for t, line, top in imps if not top]
    assert local == []


def test_import_graph_has_no_cycle(graph):
    _, edges = graph
    succ = {m: sorted({t for t, _, _ in imps}) for m, imps in edges.items()}
    state, cycles = {}, []

    def walk(m, stack):
        state[m] = "open"
        stack.append(m)
        for t in succ.get(m, ()):
            if state.get(t) == "open":
                cycles.append(" -> ".join(stack[stack.index(t):] + [t]))
            elif t not in state:
                walk(t, stack)
        stack.pop()
        state[m] = "done"

    for m in sorted(succ):
        if m not in state:
            walk(m, [])
    assert cycles == []


def test_modules_are_small_and_uniquely_named(graph):
    modules, _ = graph
    big = {m: n for m, p in modules.items() if (n := sum(1 for _ in open(p))) > MAX_LINES}
    assert big == {}
    names = collections.defaultdict(list)
    for m, p in modules.items():
        if os.path.basename(p) not in ("__init__.py", "__main__.py"):
            names[m.rpartition(".")[2]].append(m)
    assert {n: ms for n, ms in names.items() if len(ms) > 1} == {}


def test_library_code_never_exits():
    """Only the CLI layer turns errors into exits."""
    cli_layer = dict(LAYERS)["commands"]
    offenders = []
    for m, p in _modules().items():
        if _layer(m) == len(LAYERS) - 1 or m.startswith("fr_jax.harness.sandbox"):
            continue  # the sandbox's child-process source reports SystemExit, never raises it
        for n, line in enumerate(open(p), 1):
            if "raise SystemExit" in line or "sys.exit(" in line:
                offenders.append(f"{m}:{n}")
    assert cli_layer and offenders == []


# What each command must not import at start-up (`--help` included): the floors it never uses.
# A command's own packages are everything else it reaches; those that use the bundled toy
# world's training files (train, seqroute, data.pairs) reach the code that writes them
# (toy.world_data, toy.world_pairs), never the demo pipeline.
_LOW = ("fr_jax.toy", "fr_jax.aot", "fr_jax.datagen", "fr_jax.baselines")
UNUSED = {
    "plan": ("fr_jax.toy", "fr_jax.harness", "fr_jax.loop", "fr_jax.corpus", "fr_jax.datagen",
             "fr_jax.baselines", "fr_jax.data"),
    "decode": _LOW + ("fr_jax.harness", "fr_jax.loop", "fr_jax.steps"),
    "serve": _LOW + ("fr_jax.harness", "fr_jax.loop", "fr_jax.steps"),
    "eval": _LOW + ("fr_jax.loop", "fr_jax.steps"),
    "merge": ("fr_jax.toy", "fr_jax.aot", "fr_jax.datagen", "fr_jax.harness", "fr_jax.loop",
              "fr_jax.steps", "fr_jax.inference", "fr_jax.routing", "fr_jax.corpus"),
    "launch": ("fr_jax.models", "fr_jax.hf", "fr_jax.routing", "fr_jax.inference",
               "fr_jax.corpus", "fr_jax.steps", "fr_jax.loop") + _LOW + ("fr_jax.harness",),
    "data.sft": ("fr_jax.toy", "fr_jax.aot", "fr_jax.baselines", "fr_jax.loop", "fr_jax.steps",
                 "fr_jax.inference", "fr_jax.models"),
    "train": ("fr_jax.aot", "fr_jax.baselines", "fr_jax.toy.pipeline", "fr_jax.toy.checks"),
    "seqroute": ("fr_jax.aot", "fr_jax.loop", "fr_jax.steps", "fr_jax.baselines.merging",
                 "fr_jax.toy.pipeline"),
    "data.pairs": ("fr_jax.aot", "fr_jax.loop", "fr_jax.steps", "fr_jax.baselines",
                   "fr_jax.toy.pipeline"),
    "demo": ("fr_jax.aot",), "ablate": ("fr_jax.aot",),
}


def test_each_command_imports_only_the_floors_it_uses():
    """Each command module imported alone, as `python -m fr_jax.<command> --help` does: the
    fr_jax packages in sys.modules afterwards include none of those the command never uses
    (fr_jax.plan reaches no toy world, evaluation, training loop or data code)."""
    commands = sorted(m.split(".", 1)[1] for m in _modules()
                      if _is_command_module(m) or m.startswith("fr_jax.data."))
    assert sorted(UNUSED) == commands
    probe = ("import importlib, json, sys; importlib.import_module(sys.argv[1]); "
             "print(json.dumps(sorted(m for m in sys.modules if m.startswith('fr_jax.'))))")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    procs = {c: subprocess.Popen([sys.executable, "-c", probe, f"fr_jax.{c}"], env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for c in commands}
    found = {}
    for c, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
        loaded = json.loads(out.strip().splitlines()[-1])
        found[c] = sorted({p for p in UNUSED[c] for m in loaded
                           if m == p or m.startswith(p + ".")})
    assert found == {c: [] for c in commands}
