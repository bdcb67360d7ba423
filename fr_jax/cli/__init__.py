"""The one CLI layer every command uses: `Command` / `Flag` as data, flags parsed onto the
config, errors turned into one-line exits (command.py), and the --help / --helpfull screens
(usage.py)."""

from fr_jax.cli.command import (HELP, Command, Flag, apply_shortcuts,  # noqa: F401
                                config_file_of, default_config_file, main, parse_flags,
                                split_list, use_bundled_world)
