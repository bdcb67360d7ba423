"""What fr_jax imports is what `pip install -e .` installs.

The test extra pulls in packages of its own (torch brings jinja2, for one), so a runtime
dependency missing from requirements.txt stays hidden from every test that runs in the test
environment; `.ci/run`'s first phase runs the main job in a runtime-only install, and this
test names the distribution of every third-party module fr_jax imports.
"""

import ast
import importlib.metadata as md
import os
import re
import sys

from cli_env import REPO

# Extras: modules fr_jax may import only lazily, inside a function, with a message that
# names the extra (requirements file -> why it is not a runtime requirement).
EXTRAS = {
    "requirements-tpu.txt": "the TPU compiler (fr_jax.plan) and TPU runtime",
    "requirements-tensorboard.txt": "the TensorBoard viewer",
}


# Distributions a dependency imports lazily on a path fr_jax runs -> that path.
LAZY = {"jinja2": "transformers' apply_chat_template: every prompt in a chat template",
        "protobuf": "tensorboardX's event files"}


def requirement_names(name: str) -> set:
    """Normalised distribution names of a requirements file, following `-r` lines."""
    out = set()
    for line in open(os.path.join(REPO, name)):
        line = line.split("#")[0].strip()
        if line.startswith("-r"):
            out |= requirement_names(line[2:].strip())
        elif line:
            out.add(normalise(re.split(r"[\[=<>!~; ]", line, maxsplit=1)[0]))
    return out


def normalise(dist: str) -> str:
    return re.sub(r"[-_.]+", "-", dist).lower()


def imported_modules():
    """{top-level module: [file:line, ...]} of every absolute import under fr_jax/ (and every
    importlib.import_module("literal")), fr_jax itself and the standard library left out."""
    found = {}
    for root, _, files in os.walk(os.path.join(REPO, "fr_jax")):
        for f in files:
            if not f.endswith(".py"):
                continue
            path = os.path.join(root, f)
            for node in ast.walk(ast.parse(open(path).read(), path)):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0:
                    names = [node.module]
                elif (isinstance(node, ast.Call) and getattr(node.func, "attr", "") ==
                      "import_module" and node.args and isinstance(node.args[0], ast.Constant)):
                    names = [node.args[0].value]
                else:
                    continue
                for name in names:
                    top = name.split(".")[0]
                    if top != "fr_jax" and top not in sys.stdlib_module_names:
                        found.setdefault(top, []).append(
                            f"{os.path.relpath(path, REPO)}:{node.lineno}")
    return found


def test_every_module_fr_jax_imports_comes_from_a_runtime_requirement():
    runtime = requirement_names("requirements.txt")
    owners = md.packages_distributions()
    missing = {}
    for module, where in sorted(imported_modules().items()):
        dists = {normalise(d) for d in owners.get(module, [])}
        assert dists, f"{module} (imported at {where[0]}) is installed by no distribution here"
        if not dists & runtime:
            missing[module] = (sorted(dists), where)
    assert not missing, ("imported by fr_jax but not in requirements.txt (add it there, or "
                         f"to an extra and import it lazily): {missing}")


def test_the_extras_are_installable_and_named_in_setup():
    setup = open(os.path.join(REPO, "setup.py")).read()
    runtime = requirement_names("requirements.txt")
    for name in EXTRAS:
        assert f'requirements("{name}")' in setup, name
        assert requirement_names(name) - runtime, f"{name} adds nothing to the runtime"


def test_what_fr_jax_s_dependencies_import_lazily_on_its_paths_is_a_requirement():
    """Modules a dependency imports only inside the call fr_jax makes, and does not install
    itself: invisible to the import scan above and hidden by the test extra."""
    runtime = requirement_names("requirements.txt")
    for dist, why in LAZY.items():
        assert dist in runtime, f"{dist} ({why}) is missing from requirements.txt"
