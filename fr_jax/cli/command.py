"""The command-line layer: what every `python -m fr_jax.<command>` shares.

A command is data (`Command`: its name, its default config file, its flag shortcuts); `main`
parses `--config` (an ml_collections file, any field overridable as `--config.a.b=value`)
and the shortcuts, writes each shortcut into the config field it stands for, fills in the
bundled toy world where the config names no checkpoints, runs the command's body and turns
every `FrJaxError` (and the ValueErrors of bad arguments) into a one-line `error: ...`
exit. Library code raises; only this module exits. Set FR_JAX_TRACEBACK=1 to see the
traceback instead. `-h` / `--help` / `--helpfull` print the command's screen
(fr_jax/cli/usage.py); a command line that cannot be parsed exits with status 2 and one line.
"""

from __future__ import annotations

import ast
import dataclasses
import logging
import os
import runpy
import sys
import traceback
from typing import Callable, Optional, Sequence, Tuple

from absl import flags
from ml_collections import config_flags

from fr_jax.cli import usage
from fr_jax.config import check_ranges, default_config_file
from fr_jax.runtime import distributed
from fr_jax.runtime.bundle import bundled_world
from fr_jax.runtime.errors import FrJaxError, Interrupted


@dataclasses.dataclass(frozen=True)
class Flag:
    """A shortcut flag `--name=value` for the config field `field` (dotted; None: a flag
    of its own, read from the parsed flags). kind: string | integer | list (comma-separated,
    -> tuple) | multi (repeatable, -> tuple)."""

    name: str
    field: Optional[str]
    help: str
    kind: str = "string"


@dataclasses.dataclass(frozen=True)
class Command:
    name: str  # python -m fr_jax.<name>
    config_file: str  # default config, under configs/
    flags: Tuple[Flag, ...] = ()
    errors: Tuple[type, ...] = (FrJaxError, ValueError)  # -> one-line exits
    # Runs on devices: joins a multi-process launch (fr_jax.runtime.distributed) before any JAX
    # call, with config.train.distributed's mode (auto | yes | no) where the config has it.
    devices: bool = True
    # --help: the config's sections shown field by field (() = all; the others by name;
    # top-level fields always).
    sections: Tuple[str, ...] = ()
    doc: str = "README.md"  # --help's "more:" -- the page that explains the command


HELP = ("-h", "--help", "--helpfull")


class UsageError(SystemExit):
    """A command line that cannot be parsed: one line, exit status 2 (str() is the line)."""

    def __init__(self, message: str):
        super().__init__(message)
        self.code = 2


def split_list(value: str) -> Tuple[str, ...]:
    return tuple(x.strip() for x in value.split(",") if x.strip())


def _define(flag: Flag, fv):
    define = {"string": flags.DEFINE_string, "integer": flags.DEFINE_integer,
              "list": flags.DEFINE_string, "multi": flags.DEFINE_multi_string}[flag.kind]
    define(flag.name, None, flag.help + (f" (sets config.{flag.field})" if flag.field else ""),
           flag_values=fv)


def _known_fields(config_file: str):
    path, _, arg = config_file.partition(":")
    try:
        get_config = runpy.run_path(path)["get_config"]
        return sorted(usage.fields(get_config(arg) if arg else get_config()))
    except Exception:  # the file itself is the problem; the absl message says why
        return []


def config_file_of(argv, default: str) -> str:
    """The config file (with its :ARG) a command line names, else `default`."""
    files = [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
    return files[-1] if files else default


def parse_flags(argv, config_file: str, extra: Sequence[Flag] = ()):
    """Defines `--config` (an ml_collections config file, overridable field by field) and
    the `extra` flags, parses argv (argv[0] is the program) and returns the absl
    FlagValues. A command line that does not parse raises UsageError: one line naming the
    problem, with the closest known names for a mistyped flag or field."""
    _refuse_repeats(argv[1:], extra)
    loaded = _load_config_file(config_file_of(argv[1:], config_file))
    argv = [argv[0]] + _comma_lists(argv[1:], loaded)
    flag_values = flags.FlagValues()
    try:
        config_flags.DEFINE_config_file("config", config_file, "ml_collections config file",
                                        flag_values=flag_values, lock_config=True,
                                        sys_argv=list(argv))
        for flag in extra:
            _define(flag, flag_values)
        rest = flag_values(argv)
        list(flag_values.config.keys())  # the file loads lazily: make a bad path fail here
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError, OSError) as e:
        raise UsageError(_parse_error(e, argv, config_file, extra)) from None
    if len(rest) > 1:
        raise UsageError(f"unexpected arguments {' '.join(rest[1:])}: flags are written "
                         "--name=value (see --help)")
    return flag_values


def _refuse_repeats(args, extra: Sequence[Flag]):
    """A field set twice on one command line is refused: absl would append a tuple field's
    second value to the first (five experts from two lists of three and two) and keep a
    scalar's last, so either reading of the line is a guess."""
    seen = {}
    shortcuts = {f"--{f.name}": f for f in extra}
    for arg in args:
        if not arg.startswith("--") or arg == "--":
            continue  # the value of a `--name value` pair
        name = arg.split("=", 1)[0]
        multi = name in shortcuts and shortcuts[name].kind == "multi"
        if multi and seen.get(shortcuts[name].field) == name:
            continue  # repeatable by design (--prompt), but not beside its field
        if name in shortcuts and shortcuts[name].field:
            field = shortcuts[name].field
        elif name.startswith("--config."):
            field = name[len("--config."):]
        else:
            field = name
        if field in seen and name == "--config":
            raise UsageError("--config is given twice: name one config file (override its "
                             "fields with --config.FIELD=VALUE)")
        if field in seen and seen[field] == name:
            raise UsageError(f"{name} is given twice: give each field once (a tuple field "
                             "takes all its items in one value, e.g. "
                             "--config.experts.paths=/ckpt/a,/ckpt/b)")
        if field in seen:
            raise UsageError(f"{field} is given twice ({seen[field]} and {name}): give it once")
        seen[field] = name


def _load_config_file(spec: str):
    """The ConfigDict of a config file `path[:arg]`, loaded here first so that a broken file
    is reported as file:line and its message (absl would print its own 30-line traceback);
    None when the file does not exist (the parse error names it, with fr_jax's own)."""
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            code = compile(f.read(), path, "exec")
    except SyntaxError as e:
        raise UsageError(f"config file {path}:{e.lineno}: {e.msg}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read the config file {path}: {e}") from None
    scope = {"__file__": path, "__name__": "fr_jax_config_file"}
    try:
        exec(code, scope)  # noqa: S102 -- a config file is Python by design
        get_config = scope.get("get_config")
        if not callable(get_config):
            raise UsageError(f"config file {path} defines no get_config(): an ml_collections "
                             "config file returns its ConfigDict from get_config()")
        return get_config(arg) if arg else get_config()
    except UsageError:
        raise
    except Exception as e:  # whatever the file's own code raised: point at its line
        frames = [f for f in traceback.extract_tb(e.__traceback__) if f.filename == path]
        where = f"{path}:{frames[-1].lineno}" if frames else path
        raise UsageError(f"config file {where}: {type(e).__name__}: {e}") from None


def _comma_lists(args, config) -> list:
    """`--config.experts.paths=/a,/b` (the comma form merge's --experts takes) as the tuple
    it means; absl reads a tuple field's value only as a Python literal."""
    if config is None:
        return list(args)
    out = []
    for arg in args:
        name, eq, value = arg.partition("=")
        field = name[len("--config."):]
        if (eq and name.startswith("--config.") and "," in value
                and value.strip()[:1] not in "([\'\"" and field in set(usage.fields(config))):
            default = config
            for part in field.split("."):
                default = default[part]
            if isinstance(default, (tuple, list)):
                arg = f"{name}={tuple(_item(x) for x in split_list(value))!r}"
        out.append(arg)
    return out


def _item(text: str):
    """One element of a comma list: a number where it reads as one, else the text."""
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text
    return value if isinstance(value, (int, float, bool)) else text


def _parse_error(e: Exception, argv, config_file: str, extra: Sequence[Flag]) -> str:
    """One line for an absl / config_flags parse error."""
    args = argv[1:]
    known = _known_fields(config_file_of(args, config_file))
    unknown = [a[len("--config."):].split("=")[0] for a in args if a.startswith("--config.")]
    unknown = [f for f in unknown if known and f not in known]
    if unknown:
        return (f"unknown config field {unknown[0]}{usage.did_you_mean(unknown[0], known)}; "
                "--helpfull lists every field")
    if isinstance(e, flags.UnrecognizedFlagError):
        names = ["--config"] + [f"--{f.name}" for f in extra]
        return (f"unknown flag --{e.flagname}{usage.did_you_mean('--' + e.flagname, names)}; "
                f"the flags are {', '.join(names)} and --config.FIELD=VALUE (see --help)")
    path = config_file_of(args, config_file).partition(":")[0]
    if not os.path.isfile(path):
        root = os.path.dirname(default_config_file())
        ours = sorted(os.path.relpath(os.path.join(d, f), root) for d, _, files in os.walk(root)
                      for f in files if f.endswith(".py"))
        return (f"config file {path} does not exist (fr_jax's own, in {os.path.relpath(root)}/: "
                f"{', '.join(ours)})")
    message = " ".join(str(e).strip("\"'").split())  # absl's multi-line messages, one line
    if "Failed loading config file" in message:
        return f"cannot load the config file {path}: {message}"
    return f"bad command line ({' '.join(a for a in args if a.startswith('--'))}): {message}"


def _set(config, field: str, value):
    *parents, leaf = field.split(".")
    node = config
    for p in parents:
        node = node[p]
    setattr(node, leaf, value)


def apply_shortcuts(config, fv, shortcuts: Sequence[Flag]):
    """Writes every shortcut flag that was given into its config field."""
    with config.unlocked():
        for flag in shortcuts:
            value = fv[flag.name].value
            if flag.field is None or value is None or value == []:
                continue
            if flag.kind == "list":
                value = split_list(value)
            elif flag.kind == "multi":
                value = tuple(value)
            _set(config, flag.field, value)


def use_bundled_world(config, router: str = "router") -> bool:
    """Where the config names no checkpoints: the trained toy world shipped in the package
    (its `router` -- the trained one, or "router_base" to train afresh -- experts,
    baselines and SharedTrunkNet). Returns True when the bundle was used."""
    if config.router.path or config.experts.paths:
        return False
    world = bundled_world()
    with config.unlocked():
        config.router.path = world[router]
        config.experts.paths = tuple(world["experts"])
        config.experts.names = config.experts.names or tuple(world["names"])
        for model in ("merged", "finetuned"):
            setattr(config.baselines, model, getattr(config.baselines, model) or world[model])
        config.seqroute.path = config.seqroute.path or world["seqroute"]
    return True


def main(command: Command, body: Callable, argv=None):
    """Parses argv for `command`, applies its shortcuts and runs body(config, flag values);
    returns what body returns. -h / --help / --helpfull print the command's screen."""
    logging.basicConfig(level=logging.WARNING)
    argv = list(sys.argv[1:] if argv is None else argv)
    default = default_config_file(command.config_file)
    try:
        fv = parse_flags([f"fr_jax.{command.name}"] + [a for a in argv if a not in HELP],
                         default, command.flags)
        config = fv.config
        apply_shortcuts(config, fv, command.flags)
        if any(a in HELP for a in argv):
            print(usage.render(command, sys.modules[body.__module__].__doc__, config,
                               config_file_of(argv, default).partition(":")[0],
                               full="--helpfull" in argv), end="", flush=True)
            raise SystemExit(0)
        check_ranges(config)  # before any work: a NaN or negative knob never runs
        if command.devices:
            distributed.initialize(config.train.distributed if "train" in config else "auto")
        return body(config, fv)
    except UsageError as e:  # also a command line that the body parses (fr_jax.launch's)
        print(f"error: {e}", file=sys.stderr)
        raise
    except (Interrupted, KeyboardInterrupt) as e:  # Ctrl-C: where it stopped, no traceback
        print(f"interrupted{': ' + str(e) if str(e) else ''}", file=sys.stderr, flush=True)
        raise SystemExit(130) from None
    except command.errors as e:
        if os.environ.get("FR_JAX_TRACEBACK"):
            raise
        raise SystemExit(f"error: {e}") from None
