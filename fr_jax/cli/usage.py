"""`--help` and `--helpfull` of every `python -m fr_jax.<command>`, and "did you mean".

A command's screen is assembled from what already describes it, so it cannot drift from the
code: the command module's docstring (what it does, its usual command lines), its own flags
(`cli.Flag`), and the config it would run with -- every field's value after the command
line's overrides, with the comment written beside (or just above) that field's assignment
in fr_jax/config/base.py's `base_config` or in the config file itself as its description.
"""

from __future__ import annotations

import ast
import difflib
import inspect
import io
import os
import textwrap
import tokenize
from typing import Dict, Iterable, List, Optional, Sequence

import ml_collections

from fr_jax.config import base
from fr_jax.config.demo_sections import demo_field_docs

WIDTH = 100  # characters per line of a help screen


# ------------------------------------------------------------------ field descriptions
def _comments(source: str) -> Dict[int, tuple]:
    """{line: (comment text, whether the comment has the line to itself)}."""
    out, code_lines = {}, set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            out[tok.start[0]] = tok.string.lstrip("#").strip()
        elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT,
                              tokenize.DEDENT, tokenize.ENDMARKER):
            code_lines.update(range(tok.start[0], tok.end[0] + 1))
    return {line: (text, line not in code_lines) for line, text in out.items()}


def _dotted(node) -> Optional[str]:
    """`c.decode.mode` -> "decode.mode" (the root variable dropped); None for anything else."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    return ".".join(reversed(parts)) if parts and isinstance(node, ast.Name) else None


def _writes_a_dict(value) -> bool:
    """`ConfigDict(dict(a=1))`, `ConfigDict({...})`, `ConfigDict({k: ... for k in ...})`."""
    return isinstance(value, ast.Call) and bool(value.args) and (
        isinstance(value.args[0], (ast.Dict, ast.DictComp)) or (
            isinstance(value.args[0], ast.Call) and getattr(value.args[0].func, "id", "") ==
            "dict"))


def field_comments(path: str, functions: Sequence[str] = ()) -> Dict[str, str]:
    """{dotted field: its comment} for every `c.a.b = ...` in the file (only inside
    `functions` where given): the comment on the assignment's first line, else the block of
    comment lines directly above it."""
    source = open(path).read()
    comments = _comments(source)
    tree = ast.parse(source, path)
    scopes = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)
              and (not functions or n.name in functions)]
    out = {}
    for scope in scopes:
        for node in ast.walk(scope):
            if not isinstance(node, ast.Assign):
                continue
            targets = [t for target in node.targets for t in
                       (target.elts if isinstance(target, ast.Tuple) else [target])]
            names = [n for n in map(_dotted, targets) if n]
            if not names:
                continue
            text, own_line = comments.get(node.lineno, ("", True))
            if own_line:  # no comment beside it: the comment block above, if any
                block, line = [], node.lineno - 1
                while line in comments and comments[line][1]:
                    block.insert(0, comments[line][0])
                    line -= 1
                text = " ".join(block)
            if text:
                for name in names:
                    out.setdefault(name, text)
                if _writes_a_dict(node.value):
                    # decode.mesh = ConfigDict(dict(data=0, ...)): its fields share the comment
                    out.setdefault(names[0] + ".*", text)
    return out


def field_docs(config_file: str) -> Dict[str, str]:
    """Descriptions of a config file's fields: the base config's and the demo's sections'
    (each field's row, see fr_jax.config.settings), then the file's own comments for the
    fields no row declares."""
    docs = {**base.field_docs(), **demo_field_docs()}
    for name, text in field_comments(config_file).items():
        docs.setdefault(name, text)
    return docs


def describe(field: str, docs: Dict[str, str]) -> str:
    """A field's description: its own; else, inside a dict written in one assignment
    (decode.mesh.data), that assignment's; else that of the one field of the same name
    in another section; else
    that of the attribute a helper function sets (`s.steps = steps  # ...`)."""
    if field in docs:
        return docs[field]
    parts = field.split(".")
    for n in range(len(parts) - 1, 0, -1):
        if ".".join(parts[:n]) + ".*" in docs:
            return docs[".".join(parts[:n]) + ".*"]
    same = [k for k in docs if "." in field and k.endswith("." + field)]
    if len(same) == 1:
        return docs[same[0]]
    return docs.get(parts[-1], "")


def one_line(text: str, width: int) -> str:
    """The first sentence of `text` (up to a '. ' or '; ' outside parentheses), cut to
    `width` characters."""
    depth = 0
    for i, ch in enumerate(text):
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if depth == 0 and text[i:i + 2] in (". ", "; "):
            text = text[:i]
            break
    text = text.rstrip(".")
    return text if len(text) <= width else text[:width - 3].rstrip() + "..."


# ------------------------------------------------------------------ the screens
def fields(config, prefix: str = "") -> Iterable[str]:
    """Every leaf field of a ConfigDict, dotted."""
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            yield from fields(value, prefix + key + ".")
        else:
            yield prefix + key


def _value(v, width: int = 28) -> str:
    text = repr(tuple(v) if isinstance(v, list) else v)
    return text if len(text) <= width else text[:width - 4] + "..." + text[-1]


def _field_line(shown: str, dotted: str, value, docs, indent: int, full: bool) -> List[str]:
    """`shown = value  description` (the description wrapped below it with `full`)."""
    head = f"{' ' * indent}{shown} = {_value(value, 60 if full else 28)}"
    text = describe(dotted, docs)
    if full:
        return [head] + [" " * (indent + 4) + line
                         for line in textwrap.wrap(text, WIDTH - indent - 4)]
    pad = max(len(head) + 2, 44)
    return [head.ljust(pad) + one_line(text, WIDTH - pad)] if text and WIDTH - pad > 20 \
        else [head]


def _section(config, key: str, docs, full: bool) -> List[str]:
    """One top-level entry: a leaf on one line; a section as its leaves one line each and
    each dict inside it as one line listing its fields (every leaf of it with `full`)."""
    node = config[key]
    if not isinstance(node, ml_collections.ConfigDict):
        return _field_line(key, key, node, docs, 2, full)
    about = describe(key, docs)
    out = [f"  {key}:" + (f"  {one_line(about, WIDTH - len(key) - 5)}" if about else "")]
    for name, value in node.items():
        dotted = f"{key}.{name}"
        if not isinstance(value, ml_collections.ConfigDict):
            out += _field_line(name, dotted, value, docs, 4, full)
        elif full:
            for leaf in fields(value, dotted + "."):
                out += _field_line(leaf[len(key) + 1:], leaf, _get(config, leaf), docs, 4,
                                   True)
        else:
            line = f"    {name}.*: {', '.join(value.keys())}"
            out.append(line if len(line) <= WIDTH else line[:WIDTH - 4] + " ...")
    return out


def _get(config, dotted: str):
    node = config
    for part in dotted.split("."):
        node = node[part]
    return node


def render(command, module_doc: str, config, config_file: str, full: bool = False) -> str:
    """The help screen of `command` (a cli.Command) for `config` (as the command line
    would run it, read from `config_file`)."""
    docs = field_docs(config_file)
    name = f"python -m fr_jax.{command.name}"
    out = [f"usage: {name} [--config=FILE] [--config.FIELD=VALUE ...]"
           + (" [--FLAG=VALUE ...]" if command.flags else ""), ""]
    doc = inspect.cleandoc(module_doc or "").replace(f"`{name}`: ", "", 1)
    doc = doc[:1].upper() + doc[1:]
    out += [line.rstrip() for line in doc.splitlines()] + [""]
    rel = os.path.relpath(config_file)
    out.append("flags:")
    rows = [("--config=FILE[:ARG]", f"config file (now {rel}); :ARG is passed to its "
             "get_config"),
            ("--config.FIELD=VALUE", "any config field below, once; a tuple as a,b")]
    for flag in command.flags:
        rows.append((f"--{flag.name}=" + {"integer": "N", "list": "A,B"}.get(flag.kind, "X"),
                     flag.help + (" (repeatable)" if flag.kind == "multi" else "")
                     + (f" (sets {flag.field})" if flag.field else "")))
    rows.append(("-h, --help / --helpfull", "this screen / every config field, described"))
    pad = max(len(r[0]) for r in rows) + 2
    for left, right in rows:
        wrapped = textwrap.wrap(right, WIDTH - pad - 2, subsequent_indent="  ")
        out += [f"  {(left if i == 0 else '').ljust(pad)}{line}"
                for i, line in enumerate(wrapped)]
    leaves = [k for k in config.keys() if not isinstance(config[k], ml_collections.ConfigDict)]
    shown = [k for k in config.keys() if full or not command.sections
             or k in command.sections or k in leaves]
    out += ["", "config fields" + (" (every field; " if full else " (")
            + "override with --config.FIELD=VALUE):"]
    for key in leaves:
        out += _section(config, key, docs, full)
    for key in shown:
        if key not in leaves:
            out += _section(config, key, docs, full)
    rest = [k for k in config.keys() if k not in shown]
    if rest:
        out += textwrap.wrap(f"also in this config (--helpfull): {', '.join(rest)}",
                             WIDTH, initial_indent="  ", subsequent_indent="    ")
    out += ["", f"more: {command.doc}" + ("" if full else "; every field: --helpfull")]
    return "\n".join(out) + "\n"


def did_you_mean(unknown: str, known: Iterable[str]) -> str:
    """' (did you mean a or b?)' for the closest known names, '' when none is close."""
    known = list(known)
    close = difflib.get_close_matches(unknown, known, n=2, cutoff=0.7)
    if not close:  # the right name in another section (decode.lr -> train.sft.lr)
        leaf = unknown.split(".")[-1]
        close = [k for k in known if k.split(".")[-1] == leaf][:3]
    return f" (did you mean {' or '.join(close)}?)" if close else ""

