"""`python -m fr_jax.launch`: what a launch on a TPU slice would run, checked on this machine
before anything is created (`launch/tpu_vm.sh --dry-run` calls it).

    python -m fr_jax.launch --slice=v5p-32 -- python -m fr_jax.train \\
        --config=configs/gemma2.py --config.mesh.data=2 --config.mesh.fsdp=-1

Prints the slice (chips, hosts), the mesh the fr_jax command would build from its config
and flags, and the command line of every worker (each host runs the same program; JAX's
multi-controller runtime joins them). Exit status 1 when the mesh does not cover the
slice's chips exactly.
"""

from __future__ import annotations

import importlib
import shlex
import sys
from typing import List, Optional, Sequence

from fr_jax import cli
from fr_jax.config import decode_mesh, default_config_file
from fr_jax.runtime.errors import ConfigError
from fr_jax.runtime.hardware import SLICES, slice_size
from fr_jax.runtime.sharding import MESH_AXES, mesh_sizes

COMMAND = cli.Command("launch", "tiny.py", (
    cli.Flag("slice", None, f"TPU slice (accelerator type), one of {', '.join(SLICES)}"),
    cli.Flag("dir", None, "the checkout's folder on every worker"),
    cli.Flag("setup", None, "what every worker runs before the command"),
), devices=False,
    sections=("mesh",), doc="launch/README.md")

# fr_jax commands whose programs run on the decoding mesh (config.decode.mesh).
DECODING = ("decode", "eval", "evaluate")


def fr_jax_command(argv: Sequence[str]) -> Optional[str]:
    """`train` for `python -m fr_jax.train ...`; None for anything else."""
    for i, a in enumerate(argv[:-1]):
        if a == "-m" and argv[i + 1].startswith("fr_jax."):
            return argv[i + 1][len("fr_jax."):]
    return None


def command_mesh(argv: Sequence[str]) -> Optional[dict]:
    """The mesh sizes ({axis: size}, one may be -1) the fr_jax command `argv` would build,
    from its config file and --config.* flags; None when argv is no fr_jax command."""
    name = fr_jax_command(argv)
    if name is None:
        return None
    module = importlib.import_module("fr_jax." + ("evaluate" if name == "eval" else name))
    config_args = [a for a in argv if a.startswith("--config=") or a.startswith("--config.")]
    fv = cli.parse_flags([f"fr_jax.{name}"] + config_args,
                         default_config_file(module.COMMAND.config_file))
    mesh = decode_mesh(fv.config) if name in DECODING else fv.config.mesh
    return {a: int(mesh[a]) for a in MESH_AXES}


def check_mesh(mesh: dict, chips: int, slice_name: str) -> dict:
    """The mesh with -1 resolved (sharding.mesh_sizes); ConfigError unless it has exactly
    `chips` devices."""
    try:
        return mesh_sizes(mesh, chips)
    except ValueError as e:
        raise ConfigError(f"{slice_name} has {chips} chips: {e} (the fields: "
                          "--config.mesh.<axis>, or config.decode.mesh for decoding)") from None


def worker_lines(hosts: int, directory: str, setup: str, argv: Sequence[str]) -> List[str]:
    cmd = " ".join(shlex.quote(a) for a in argv)
    remote = f"cd {directory} && " + (f"{setup} && " if setup else "") + cmd
    return [f"worker {i}: {remote}" for i in range(hosts)]


def launch(argv: Sequence[str], fv) -> int:
    if not fv.slice:
        raise ConfigError("--slice is required (the slice's accelerator type, e.g. v5p-32)")
    if not argv:
        raise ConfigError("no command: give it after --, e.g. -- python -m fr_jax.train ...")
    chips, hosts = slice_size(fv.slice)
    print(f"slice {fv.slice}: {chips} chips on {hosts} host{'s' * (hosts > 1)}, "
          f"one JAX process per host")
    mesh = command_mesh(argv)
    if mesh is None:
        print("mesh: not an fr_jax command, not checked")
    else:
        sizes = check_mesh(mesh, chips, fv.slice)
        print("mesh: " + " x ".join(f"{a}={s}" for a, s in sizes.items())
              + f" = {chips} devices: covers the slice")
    for line in worker_lines(hosts, fv.dir or "~/fr_jax", fv.setup or "", argv):
        print(line)
    return 0


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    tail = []
    if "--" in argv:
        tail = argv[argv.index("--") + 1:]
        argv = argv[:argv.index("--")]
    return cli.main(COMMAND, lambda config, fv: launch(tail, fv), argv)


if __name__ == "__main__":
    sys.exit(main())
