"""What a command writes: checks made before it does any work (an output whose folder is
missing or not writable fails at the start, not after an hour of decoding, and no command
ever writes over one of its own inputs), and whole-file writes that a crash never leaves
half done."""

from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Iterable, Union

from fr_jax.runtime.errors import ConfigError


def check_output(path: str, what: str, inputs: Iterable[str] = (),
                 makes_folders: bool = False, kind: str = "") -> str:
    """Raises ConfigError when `path` (a file or folder to be written, named `what` in the
    message) is empty, is (or holds, or lies inside) one of `inputs`, lies under a file or
    in a folder that is not writable, or, unless the writer creates missing folders
    (`makes_folders`), in a folder that does not exist; with `kind` "file" also when it is
    an existing folder, with "folder" when it is an existing file. Returns the path."""
    if not path:
        raise ConfigError(f"{what} is empty: name the {kind or 'path'} to write")
    real = os.path.realpath(path)
    for src in inputs:
        if not src:
            continue
        s = os.path.realpath(src)
        if real == s or real.startswith(s + os.sep) or s.startswith(real + os.sep):
            raise ConfigError(f"{what} {path!r} is (or overlaps) the input {src!r}: it would "
                              "be overwritten; choose another output path")
    # Found here, not by the writer after hours of work, whose error would lose that work.
    if kind == "file" and os.path.isdir(path):
        raise ConfigError(f"{what} {path!r} is an existing folder, not a file; choose "
                          "another file name")
    if kind == "folder" and os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"{what} {path!r} is an existing file, not a folder; choose another "
                          "path")
    parent = os.path.dirname(real) or "."
    existing = parent
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ConfigError(f"{what} {path!r}: {existing!r} is a file, not a folder; choose "
                          "another path")
    if not makes_folders and existing != parent:
        raise ConfigError(f"{what} {path!r}: folder {os.path.dirname(path) or '.'!r} does not "
                          "exist; create it first or choose another path")
    if not _can_create_in(existing):
        raise ConfigError(f"{what} {path!r}: folder {existing!r} is not writable; choose a "
                          "folder you can write to")
    return path


def _can_create_in(folder: str) -> bool:
    """Whether a file can be created in `folder`, tried rather than asked: os.access says
    yes to root on a read-only mount or a pseudo-filesystem, where the real write fails."""
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".fr_jax-probe-")
    except OSError:
        return False
    os.close(fd)
    os.remove(probe)
    return True


@contextlib.contextmanager
def replacing(path: str, suffix: str = ".partial"):
    """A temporary path beside `path` (this process's own: two writers never share one)
    that replaces `path` when the block ends without an error, and is removed when it
    does not: a crash or a kill never leaves half a file at `path`. Missing folders are
    made. `suffix` ends the temporary name (np.savez insists on ".npz")."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.{os.getpid()}{suffix}"
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_atomic(path: str, data: Union[str, bytes]):
    """Writes text or bytes to `path` whole (see `replacing`)."""
    with replacing(path) as tmp:
        with open(tmp, "wb" if isinstance(data, bytes) else "w") as f:
            f.write(data)
