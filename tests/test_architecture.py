"""The package's shape: its import graph has no cycle and no import of a higher floor from a
lower one, every import of fr_jax code sits at module level (none hides a cycle inside a
function), no module is over the size limit, and no two modules share a name."""

import ast
import collections
import os

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fr_jax")

# The floors, lowest first: a module may import its own floor and the floors below it. A
# module's floor is that of the longest prefix listed here (fr_jax.toy.world is the toy
# world's definition, which the eval harness's `toy` benchmark reads; the rest of fr_jax.toy
# is the demo pipeline on top of everything).
LAYERS = (
    ("foundations", ("fr_jax.errors", "fr_jax.config", "fr_jax.sharding", "fr_jax.sampling",
                     "fr_jax.bundle", "fr_jax.paths", "fr_jax.hlo_traffic",
                     "fr_jax.tensorboard", "fr_jax.hub", "fr_jax.distributed")),
    ("models", ("fr_jax.models", "fr_jax.hf")),
    ("router, experts, fusion", ("fr_jax.router", "fr_jax.experts", "fr_jax.fusion",
                                 "fr_jax.sequence")),
    ("decoding", ("fr_jax.decoding", "fr_jax.trace")),
    ("lineup loading", ("fr_jax.lineup",)),
    ("training", ("fr_jax.data", "fr_jax.losses", "fr_jax.checkpoint", "fr_jax.training")),
    ("eval, baselines, planning", ("fr_jax.eval", "fr_jax.baselines", "fr_jax.planning",
                                   "fr_jax.toy.world")),
    # The data engine decontaminates against the benchmarks and scores sampled answers.
    ("data engine", ("fr_jax.data.mixture", "fr_jax.data.preference")),
    ("toy world", ("fr_jax.toy",)),
    ("CLIs", ("fr_jax.cli", "fr_jax.usage", "fr_jax.decode", "fr_jax.train", "fr_jax.evaluate",
              "fr_jax.plan", "fr_jax.merge", "fr_jax.seqroute", "fr_jax.demo", "fr_jax.ablate",
              "fr_jax.launch", "fr_jax.eval.__main__", "fr_jax.data.sft",
              "fr_jax.data.pairs")),
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


def _layer(module):
    best, floor = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, floor = len(p), i
    return floor


@pytest.fixture(scope="module")
def graph():
    modules = _modules()
    return modules, {m: _imports(m, p, modules) for m, p in modules.items()}


def test_every_module_has_a_floor(graph):
    modules, _ = graph
    assert [m for m in modules if m != "fr_jax" and _layer(m) is None] == []


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
    cli_layer = dict(LAYERS)["CLIs"]
    offenders = []
    for m, p in _modules().items():
        if _layer(m) == len(LAYERS) - 1 or m.startswith("fr_jax.eval.sandbox"):
            continue  # the sandbox's child-process source reports SystemExit, never raises it
        for n, line in enumerate(open(p), 1):
            if "raise SystemExit" in line or "sys.exit(" in line:
                offenders.append(f"{m}:{n}")
    assert cli_layer and offenders == []
