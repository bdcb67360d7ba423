"""`python -m fr_jax.demo`: the embedded multi-domain world end to end (see
fr_jax/toy/demo.py and configs/demo.py)."""

from __future__ import annotations

import logging
import sys


def main(argv=None):
    from fr_jax.config import default_config_file, parse_flags
    from fr_jax.toy.demo import run

    logging.basicConfig(level=logging.WARNING)
    argv = list(sys.argv[1:] if argv is None else argv)
    fv = parse_flags(["fr_jax.demo"] + argv, default_config_file("demo.py"))
    return run(fv.config)


if __name__ == "__main__":
    main()
