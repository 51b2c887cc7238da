"""Our parameter tree seen one checkpoint tensor at a time.

Every format is converted through `TensorMapping`s (one per Hugging Face tensor, see `hf.py`):
`allocate` builds the output tree up front, `slot` is the view one tensor is written into, and
`fetch` reads one tensor back for export. Writing into preallocated arrays keeps peak host memory
at the output plus the tensor being read.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from llama_jax.config import ModelConfig
from llama_jax.convert.common import ConversionError


@dataclasses.dataclass(frozen=True)
class TensorMapping:
    """One Hugging Face tensor and where it lives in our parameter tree."""

    hf_name: str
    path: tuple[str, ...]  # key path in the (per-layer) parameter tree
    hf_shape: tuple[int, ...]
    shape: tuple[int, ...]  # our shape
    layer: int | None = None  # index along the stacked `layers` axis, if any
    linear: bool = True  # a torch Linear weight ([out, in]) rather than a norm/embedding

    def to_ours(self, tensor: np.ndarray) -> np.ndarray:
        """torch Linear weights are [out, in]; ours are [in, ...out]."""
        return tensor.T.reshape(self.shape) if self.linear else tensor

    def to_hf(self, tensor: np.ndarray) -> np.ndarray:
        return tensor.reshape(self.hf_shape[1], self.hf_shape[0]).T if self.linear else tensor

    def copy_into(self, slot: np.ndarray, tensor: np.ndarray) -> None:
        """`slot[...] = to_ours(tensor)` in one pass, casting to the slot's dtype, with no
        temporary copy of the tensor (a transposed reshape would make one)."""
        if self.linear:
            slot.reshape(self.hf_shape[1], self.hf_shape[0])[...] = tensor.T
        else:
            slot[...] = tensor


def numpy_dtype(name) -> np.dtype:
    """np.dtype of a name numpy alone does not know, such as "bfloat16"."""
    try:
        return np.dtype(jnp.dtype(name))
    except TypeError:
        raise ConversionError(f"{name!r} is not a dtype (try bfloat16 or float32).") from None


def param_path(cfg: ModelConfig, mapping: TensorMapping) -> tuple[str, ...]:
    if mapping.layer is None:
        return mapping.path
    layers = "layers" if cfg.scan_layers else f"layers_{mapping.layer}"
    return (layers,) + mapping.path


def _stored_shape(cfg: ModelConfig, mapping: TensorMapping) -> tuple[int, ...]:
    """The shape of the array that holds the tensor: stacked layers carry a leading L axis."""
    if mapping.layer is not None and cfg.scan_layers:
        return (cfg.n_layers,) + mapping.shape
    return mapping.shape


def allocate(cfg: ModelConfig, mappings: list[TensorMapping], dtype) -> dict:
    """The parameter tree of `cfg`, as uninitialised numpy arrays of `dtype`."""
    params: dict = {}
    for m in mappings:
        *parents, leaf = param_path(cfg, m)
        node = params
        for key in parents:
            node = node.setdefault(key, {})
        node.setdefault(leaf, np.empty(_stored_shape(cfg, m), dtype))
    return params


def _leaf(params: dict, cfg: ModelConfig, mapping: TensorMapping):
    node = params
    for key in param_path(cfg, mapping):
        if not isinstance(node, dict) or key not in node:
            raise ConversionError(
                f"The parameters lack {'/'.join(param_path(cfg, mapping))} (for {mapping.hf_name})."
            )
        node = node[key]
    return node


def slot(params: dict, cfg: ModelConfig, mapping: TensorMapping) -> np.ndarray:
    """The view of `params` (from `allocate`) that holds `mapping`'s tensor."""
    array = _leaf(params, cfg, mapping)
    return array[mapping.layer] if mapping.layer is not None and cfg.scan_layers else array


def check_shapes(params: dict, cfg: ModelConfig, mappings: list[TensorMapping]) -> None:
    """Raises ConversionError naming the first parameter whose shape `cfg` does not imply."""
    for m in mappings:
        actual, expected = tuple(np.shape(_leaf(params, cfg, m))), _stored_shape(cfg, m)
        if actual != expected:
            raise ConversionError(
                f"Parameter {'/'.join(param_path(cfg, m))} has shape {actual}, "
                f"but the model config implies {expected}."
            )


def fetch(params: dict, cfg: ModelConfig, mapping: TensorMapping) -> np.ndarray:
    """`mapping`'s tensor in our layout, from numpy or (host-readable) JAX arrays."""
    array = np.asarray(_leaf(params, cfg, mapping))  # no copy for numpy and CPU JAX arrays
    return array[mapping.layer] if mapping.layer is not None and cfg.scan_layers else array
