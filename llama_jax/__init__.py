"""llama_jax: the Llama model family in JAX and Flax."""

import glob
import os

__version__ = "0.1.0"


def _no_accelerator() -> bool:
    """No TPU (/dev/accel*, /dev/vfio/*), NVIDIA GPU (/dev/nvidia*) or AMD GPU (/dev/kfd) here."""
    patterns = ("/dev/accel[0-9]*", "/dev/vfio/[0-9]*", "/dev/nvidia[0-9]*", "/dev/kfd")
    return not any(glob.glob(pattern) for pattern in patterns)


# libtpu (the `tpu` extra, for compiling TPU programs on any host) probes for a TPU when JAX starts
# its backends and, on a host without one, prints a page of warnings before every command's
# output. Where there is no accelerator at all the CPU is the only backend anyway, so say so.
if "JAX_PLATFORMS" not in os.environ and _no_accelerator():
    os.environ["JAX_PLATFORMS"] = "cpu"
