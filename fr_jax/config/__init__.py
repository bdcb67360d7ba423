"""The config: every setting's default, range and allowed words (base.py), the base config
that configs/*.py start from."""

from fr_jax.config.base import (CHOICES, RANGES, REPO_CONFIGS, base_config,  # noqa: F401
                                check_ranges, decode_mesh, default_config_file,
                                frozen_dtype, nested, pair_source, real_family_config)
