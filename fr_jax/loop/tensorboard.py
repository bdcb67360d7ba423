"""TensorBoard event files through tensorboardX, without PyTorch.

tensorboardX probes for torch when its writer module is first imported (`try: import torch`),
only to accept torch tensors as values. Where PyTorch is installed (fr_jax's test extra pulls
it in) that probe costs every command line ~2 s of start-up for a library fr_jax never hands
a tensor. The writer is therefore imported on first use, with torch hidden from that one
import unless something in the process has already loaded it.
"""

import importlib
import sys


def _summary_writer_class():
    if "tensorboardX" in sys.modules or "torch" in sys.modules:
        return importlib.import_module("tensorboardX").SummaryWriter
    sys.modules["torch"] = None  # makes `import torch` raise ImportError for this import
    try:
        return importlib.import_module("tensorboardX").SummaryWriter
    finally:
        if sys.modules.get("torch", 0) is None:
            del sys.modules["torch"]


def summary_writer(logdir: str):
    """A tensorboardX SummaryWriter writing event files under `logdir`."""
    return _summary_writer_class()(logdir)
