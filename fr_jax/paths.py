"""Checks on what a command will write, made before it does any work: an output whose
folder is missing (or not writable) fails at the start, not after an hour of decoding, and
no command ever writes over one of its own inputs."""

from __future__ import annotations

import os
from typing import Iterable

from fr_jax.errors import ConfigError


def check_output(path: str, what: str, inputs: Iterable[str] = (),
                 makes_folders: bool = False) -> str:
    """Raises ConfigError when `path` (a file or folder to be written, named `what` in the
    message) is (or holds, or lies inside) one of `inputs`, or, unless the writer creates
    missing folders (`makes_folders`), lies in a folder that does not exist or is not
    writable; returns the path."""
    real = os.path.realpath(path)
    for src in inputs:
        if not src:
            continue
        s = os.path.realpath(src)
        if real == s or real.startswith(s + os.sep) or s.startswith(real + os.sep):
            raise ConfigError(f"{what} {path!r} is (or overlaps) the input {src!r}: it would "
                              "be overwritten; choose another output path")
    parent = os.path.dirname(real) or "."
    if makes_folders:
        return path
    if not os.path.isdir(parent):
        raise ConfigError(f"{what} {path!r}: folder {os.path.dirname(path) or '.'!r} does not "
                          "exist; create it first or choose another path")
    if not os.access(parent, os.W_OK):
        raise ConfigError(f"{what} {path!r}: folder {parent!r} is not writable")
    return path
