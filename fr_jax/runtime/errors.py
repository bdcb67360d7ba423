"""The errors fr_jax raises for bad input, one class per kind of mistake.

Library code raises these and never exits the process; the CLI layer (fr_jax/cli/command.py) turns
any `FrJaxError` into a one-line `error: ...` exit. Each message names the problem and the
fix. They subclass ValueError so callers that caught ValueError before keep working.
"""

from __future__ import annotations


class FrJaxError(ValueError):
    """Bad input to fr_jax: the message names the problem and the fix."""


class ConfigError(FrJaxError):
    """A checkpoint's config.json or a run's config cannot be used (names the key and the
    fix)."""


class CheckpointError(FrJaxError):
    """A checkpoint folder that cannot be read (names the file / tensor and the fix)."""


class DataError(FrJaxError):
    """Unreadable data (names the file and the expected format)."""


class ModeError(FrJaxError):
    """Unknown decode mode, or one that does not fit the models given."""


class CacheOverflowError(FrJaxError):
    """More tokens than the cache has slots."""


class MergeError(FrJaxError):
    """Experts that cannot be merged, or a bad merge option."""


class PlanError(FrJaxError):
    """A plan that cannot be made (names the problem and the fix)."""


class TrainError(FrJaxError):
    """A training run that cannot start (missing checkpoints, bad stage list)."""


class Interrupted(FrJaxError):
    """Ctrl-C during a long job: says where it stopped and how the same command goes on."""
