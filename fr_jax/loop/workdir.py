"""A training run's hold on its workdir, taken before any work: the folder must be one this
process can write (a read-only mount fails here, not at the first checkpoint), must not be
one of the run's input checkpoints (a stage writes `sft/`, `tensorboard/` and `config.json`
into it), and belongs to one run at a time: a second command on the same workdir is
refused, naming the first, instead of both writing the same checkpoint steps. The hold is
an advisory lock on `<workdir>/.lock` (fcntl), so a killed run never leaves a stale one."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import socket
import sys
import threading
import time
from typing import Iterable, Iterator

from fr_jax.runtime import distributed
from fr_jax.runtime.errors import TrainError

LOCK = ".lock"


def inputs_of(config) -> list:
    """The checkpoint folders a run reads (router, experts, the lm stage's init model)."""
    out = [config.router.path, *config.experts.paths]
    if "lm" in config.train.stages:
        out.append(config.train.lm.init)
    return [p for p in out if p and os.path.isdir(p)]


def check_not_an_input(workdir: str, inputs: Iterable[str]):
    """A workdir equal to, or inside, an input checkpoint folder would be written into. (An
    input inside the workdir is normal: stage cdpo reads the router stage sft exported.)"""
    real = os.path.realpath(workdir)
    for src in inputs:
        s = os.path.realpath(src)
        if real == s or real.startswith(s + os.sep):
            raise TrainError(
                f"--config.train.workdir={workdir} is (or lies inside) the input checkpoint "
                f"folder {src}: the run would write its stages and checkpoints into it; "
                "choose a workdir of its own")


@contextlib.contextmanager
def hold(config) -> Iterator[None]:
    """Checks the workdir and holds its lock (process 0 of a launch: the others share its
    files) for the block."""
    workdir = config.train.workdir
    if not workdir:
        raise TrainError("--config.train.workdir is empty: name the folder the run writes to")
    check_not_an_input(workdir, inputs_of(config))
    if not distributed.is_main():
        yield
        return
    path = os.path.join(workdir, LOCK)
    try:
        os.makedirs(workdir, exist_ok=True)
        f = open(path, "a+")
    except OSError as e:
        raise TrainError(
            f"cannot write the training workdir {workdir} ({type(e).__name__}: "
            f"{e.strerror or e}); give --config.train.workdir a folder you can write to") \
            from None
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            raise TrainError(
                f"{workdir} is in use by another training run ({_holder(f.read())}); wait for "
                "it to end, stop it, or give this run another --config.train.workdir") from None
        f.seek(0)
        f.truncate()
        f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                            "since": time.strftime("%Y-%m-%d %H:%M:%S"),
                            "command": " ".join(sys.argv)}))
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _holder(text: str) -> str:
    try:
        who = json.loads(text)
        return f"process {who['pid']} on {who['host']}, since {who['since']}"
    except (ValueError, KeyError, TypeError):
        return "a process that holds its lock"


def saved_steps(workdir: str, stage: str) -> list:
    """The checkpoint steps of `stage` on disk (Orbax's finished step folders)."""
    folder = os.path.join(workdir, stage, "checkpoints")
    names = os.listdir(folder) if os.path.isdir(folder) else []
    return sorted(int(n) for n in names if n.isdigit())


def resume_note(config, stage: str = "", step: int = -1) -> str:
    """What a Ctrl-C leaves: where the run stopped and where the same command goes on."""
    tc = config.train
    where = f"stage {stage} at step {step} of {tc[stage].steps}; " if stage else ""
    said = []
    for name in tc.stages:
        done = saved_steps(tc.workdir, name)
        said.append(f"{name} from step {done[-1]}" if done else f"{name} from its start")
        if not done or done[-1] < tc[name].steps:
            break  # the later stages have not begun
    return f"{where}the same command resumes {', then '.join(said)}"


@contextlib.contextmanager
def interrupt_after() -> Iterator[None]:
    """Holds a Ctrl-C back until the block (a checkpoint save) ends, then raises it: a save
    cut in half leaves Orbax's writer threads failing at exit and the step unfinished."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers belong to the main thread; elsewhere nothing to hold
        return
    caught = []
    previous = signal.signal(signal.SIGINT, lambda *_: caught.append(True))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt
