"""Per-sample limits, the verdict type, and the constants the parent-side modules share.

The io-dir file names are also spelled out in the runner program (runner_source), which
cannot import them: it runs in an interpreter where this project is not importable."""

from __future__ import annotations

import dataclasses
import math

_NOBODY_ID = 65534
_CAP_DAC_READ_SEARCH = 2  # the probe checks it in CapEff; the runner has its own constants
_CONFIG_NAME = "config.json"  # parent -> runner, in the io dir (names fixed in _RUNNER_SOURCE too)
_STATUS_NAME = "status"  # runner setup -> parent, in the io dir
_KEEP_CHARS = 4096
_REASON_CHARS = 300
_PROGRAM_NAME = "program.py"
_CHILD_PATH = "/usr/bin:/bin"


@dataclasses.dataclass(frozen=True)
class Limits:
    """Per-sample resource limits; the defaults suit HumanEval/MBPP programs."""

    timeout_s: float = 10.0  # wall clock
    memory_mb: int = 1024  # RLIMIT_AS
    cpu_s: int = 0  # RLIMIT_CPU; 0 = ceil(timeout_s) + 1
    max_output_bytes: int = 1 << 20  # cap on stdout+stderr each, and on any file written (RLIMIT_FSIZE)
    max_processes: int = 16  # RLIMIT_NPROC where it is enforced
    max_open_files: int = 64
    user: str = "auto"  # "auto": as root drop to nobody (65534); "none": keep the uid; or a user name

    def cpu_seconds(self) -> int:
        """RLIMIT_CPU soft limit: explicit, or a bit above the wall clock so the wall clock fires first."""
        return self.cpu_s if self.cpu_s > 0 else int(math.ceil(self.timeout_s)) + 1


@dataclasses.dataclass
class Outcome:
    """What happened to one sample.  ``status`` is one of:
    passed | failed | timeout | memory | output_limit | killed | sandbox_error."""

    status: str
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float
    reason: str

    @property
    def passed(self) -> bool:
        return self.status == "passed"
