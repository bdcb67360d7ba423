"""The config: every setting's default, range and allowed words declared once, in its row
(settings.py); the base config built from those rows, section by section, that configs/*.py
start from (base.py); the two sections the demo adds to it (demo_sections.py); and the
checks a config passes before any work (validation.py)."""

from fr_jax.config.base import (REPO_CONFIGS, base_config, decode_mesh,  # noqa: F401
                                default_config_file, frozen_dtype, nested, pair_source,
                                real_family_config, sections)
from fr_jax.config.demo_sections import demo_config  # noqa: F401
from fr_jax.config.validation import CHOICES, RANGES, check_ranges  # noqa: F401
