"""The TPU chips and slices fr_jax plans for: one table of chip specs (HBM, peak FLOP/s,
HBM and inter-chip bandwidth), the slices' topologies, and their devices from
`jax.experimental.topologies` (the TPU compiler of libtpu, on a machine with no TPU)."""

from __future__ import annotations

import dataclasses
import os

from fr_jax.runtime.errors import PlanError


GiB = 1 << 30


# ---------------------------------------------------------------------------- the hardware
@dataclasses.dataclass(frozen=True)
class Chip:
    """One TPU chip (a megacore chip for v4 / v5p): HBM, and the peaks that bound a step."""

    name: str
    hbm_gib: float  # physical
    usable_gib: float  # what the compiler may allocate (its "available HBM")
    peak_flops: float  # bf16 FLOP/s
    hbm_bw: float  # bytes/s
    ici_bw: float  # bytes/s over all the chip's ICI ports, both directions counted

    @property
    def ici_send_bw(self) -> float:
        """Bytes/s a chip sends while it receives as much: the collectives' rate (every
        port busy: a lower bound on a collective's time, see fr_jax.aot.compile)."""
        return self.ici_bw / 2


# ICI, bidirectional per chip, from Google Cloud's TPU pages (docs.cloud.google.com/tpu/docs/
# v5e, v5p, v6e: 400, 1200 and 800 GBps). The v4 page gives no per-chip figure; the TPU v4
# paper (Jouppi et al., ISCA 2023) has 6 links of 50 GB/s each way: 600 GB/s.
CHIPS = {
    "v4": Chip("TPU v4", 32, 30.75, 275e12, 1.228e12, 600e9),
    "v5e": Chip("TPU v5e", 16, 15.75, 197e12, 0.819e12, 400e9),
    "v5p": Chip("TPU v5p", 95, 95.74, 459e12, 2.765e12, 1200e9),
    "v6e": Chip("TPU v6e", 32, 31.25, 918e12, 1.64e12, 800e9),
}


# slice name -> (chip, topology for jax.experimental.topologies). v4 and v5p slices are
# named by TensorCores: v4-8 is 4 megacore chips.
SLICES = {
    "v4-8": ("v4", "v4:2x2x1"), "v4-16": ("v4", "v4:2x2x2"), "v4-32": ("v4", "v4:2x2x4"),
    "v5e-4": ("v5e", "v5e:2x2"), "v5e-8": ("v5e", "v5e:2x4"), "v5e-16": ("v5e", "v5e:4x4"),
    "v5e-32": ("v5e", "v5e:4x8"), "v5e-64": ("v5e", "v5e:8x8"),
    "v5p-8": ("v5p", "v5p:2x2x1"), "v5p-16": ("v5p", "v5p:2x2x2"), "v5p-32": ("v5p", "v5p:2x2x4"),
    "v6e-8": ("v6e", "v6e:2x4"), "v6e-16": ("v6e", "v6e:4x4"),
}


# Chips one host (TPU VM worker) holds: up to 8 v5e / v6e chips in one VM (a v5e-8 is one
# host), 4 per host in larger v5e / v6e slices and in every v4 / v5p slice.
SINGLE_HOST_CHIPS = {"v4": 4, "v5p": 4, "v5e": 8, "v6e": 8}
CHIPS_PER_HOST = 4


def check_slice(slice_name: str):
    if slice_name not in SLICES:
        raise PlanError(f"unknown TPU slice {slice_name!r}; known: {', '.join(SLICES)}")


def slice_size(slice_name: str):
    """(chips, hosts) of a slice: its JAX devices, and the processes a launch starts."""
    check_slice(slice_name)
    chip, topo = SLICES[slice_name]
    chips = 1
    for d in topo.split(":")[1].split("x"):
        chips *= int(d)
    return chips, 1 if chips <= SINGLE_HOST_CHIPS[chip] else chips // CHIPS_PER_HOST


def topology_devices(slice_name: str):
    """(Chip, the slice's TPU devices) -- abstract devices a Mesh can be built on."""
    check_slice(slice_name)
    chip, topo = SLICES[slice_name]
    # Compiling claims no TPU: let several plans (and a TPU job) load libtpu side by side
    # instead of failing on its single-process lock file.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        from jax.experimental import topologies
        kw = {"chip_config_name": "megacore"} if chip in ("v4", "v5p") else {}
        desc = topologies.get_topology_desc(platform="tpu", topology_name=topo, **kw)
    except Exception as e:  # no libtpu, or a jax without TPU AOT support
        raise PlanError(f"cannot describe TPU topology {topo!r} ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:200]}); the TPU compiler comes with libtpu: "
                        'pip install -e ".[tpu]"') from None
    return CHIPS[chip], list(desc.devices)
