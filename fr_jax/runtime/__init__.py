"""What every floor stands on: the typed errors (errors.py), local paths and their checks
(paths.py), where the bundled toy world lives (bundle.py), the mesh and the one
logical-axis rules table (sharding.py), multi-process JAX (distributed.py), and the TPU
chips and slices a run is launched on or planned for (hardware.py)."""
