"""Weights in and out of the Hugging Face format.

`load_hf(path) -> (ModelConfig, params)` reads a Hugging Face Llama directory (config.json plus
safetensors, sharded or not) tensor by tensor, without PyTorch. Hugging Face checkpoints store
q/k in the rotate-half RoPE layout, which is the layout `model.py` uses, so no permutation is
needed; every linear weight is transposed from torch's [out, in] to our [in, ...out] layout.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from safetensors import safe_open
from tqdm import tqdm

from llama_jax.config import ModelConfig, RopeScaling


class ConversionError(ValueError):
    """A checkpoint that cannot be converted; the message says which tensor or field and why."""


def config_from_hf(hf: dict, **overrides) -> ModelConfig:
    """A ModelConfig from a Hugging Face Llama config.json (transformers 4 or 5 style)."""
    if hf.get("model_type", "llama") != "llama":
        raise ConversionError(f"config.json has model_type {hf.get('model_type')!r}; only 'llama' "
                              "checkpoints are supported.")
    for flag in ("attention_bias", "mlp_bias"):
        if hf.get(flag):
            raise ConversionError(f"config.json sets {flag}=true; Llama models have no biases.")
    if hf.get("hidden_act", "silu") != "silu":
        raise ConversionError(f"config.json has hidden_act {hf['hidden_act']!r}; Llama uses 'silu'.")
    # transformers 5 writes `rope_parameters` (theta inside); released checkpoints have
    # `rope_theta` and `rope_scaling`.
    rope = dict(hf.get("rope_parameters") or {})
    theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
    if hf.get("rope_scaling"):
        rope = dict(hf["rope_scaling"])
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "default":
        scaling = None
    elif rope_type == "llama3":
        scaling = RopeScaling(factor=float(rope["factor"]),
                              low_freq_factor=float(rope["low_freq_factor"]),
                              high_freq_factor=float(rope["high_freq_factor"]),
                              original_max_position_embeddings=int(rope["original_max_position_embeddings"]))
    else:
        raise ConversionError(f"config.json asks for RoPE scaling of type {rope_type!r}; only the "
                              "default and Llama 3.1's 'llama3' type are supported.")
    n_heads = hf["num_attention_heads"]
    fields = dict(
        dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"], n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // n_heads,
        ffn_dim=hf["intermediate_size"], vocab_size=hf["vocab_size"],
        max_seq_len=hf.get("max_position_embeddings", 2048), rope_theta=float(theta),
        rope_scaling=scaling, norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)))
    fields.update(overrides)
    return ModelConfig(**fields)


@dataclasses.dataclass(frozen=True)
class TensorMapping:
    """One Hugging Face tensor and where it lives in our parameter tree."""

    hf_name: str
    path: tuple[str, ...]          # key path in the (per-layer) parameter tree
    hf_shape: tuple[int, ...]
    shape: tuple[int, ...]         # our shape
    layer: int | None = None       # index along the stacked `layers` axis, if any
    linear: bool = True            # a torch Linear weight ([out, in]) rather than a norm/embedding

    def to_ours(self, tensor: np.ndarray) -> np.ndarray:
        """torch Linear weights are [out, in]; ours are [in, ...out]."""
        return tensor.T.reshape(self.shape) if self.linear else tensor

    def to_hf(self, tensor: np.ndarray) -> np.ndarray:
        return tensor.reshape(self.hf_shape[1], self.hf_shape[0]).T if self.linear else tensor


def hf_tensor_mappings(cfg: ModelConfig) -> list[TensorMapping]:
    """Every tensor of a Hugging Face LlamaForCausalLM with our path and shape for it."""
    d, f, h, k, hd, v = cfg.dim, cfg.ffn_dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.vocab_size
    out = [TensorMapping("model.embed_tokens.weight", ("tok_embeddings",), (v, d), (v, d), linear=False),
           TensorMapping("model.norm.weight", ("norm", "weight"), (d,), (d,), linear=False)]
    if not cfg.tie_embeddings:
        out.append(TensorMapping("lm_head.weight", ("output",), (v, d), (d, v)))
    per_layer = [
        ("self_attn.q_proj.weight", ("attention", "wq"), (h * hd, d), (d, h, hd)),
        ("self_attn.k_proj.weight", ("attention", "wk"), (k * hd, d), (d, k, hd)),
        ("self_attn.v_proj.weight", ("attention", "wv"), (k * hd, d), (d, k, hd)),
        ("self_attn.o_proj.weight", ("attention", "wo"), (d, h * hd), (h, hd, d)),
        ("mlp.gate_proj.weight", ("feed_forward", "w1"), (f, d), (d, f)),
        ("mlp.up_proj.weight", ("feed_forward", "w3"), (f, d), (d, f)),
        ("mlp.down_proj.weight", ("feed_forward", "w2"), (d, f), (f, d)),
        ("input_layernorm.weight", ("attention_norm", "weight"), (d,), (d,)),
        ("post_attention_layernorm.weight", ("ffn_norm", "weight"), (d,), (d,)),
    ]
    for i in range(cfg.n_layers):
        out += [TensorMapping(f"model.layers.{i}.{name}", path, hf_shape, shape, layer=i,
                              linear=len(shape) > 1)
                for name, path, hf_shape, shape in per_layer]
    return out


def _param_path(cfg: ModelConfig, mapping: TensorMapping) -> tuple[str, ...]:
    if mapping.layer is None:
        return mapping.path
    return ("layers",) + mapping.path if cfg.scan_layers else (f"layers_{mapping.layer}",) + mapping.path


def _safetensors_files(path: Path) -> dict[str, Path]:
    """Tensor name -> file, from the index of a sharded checkpoint or the files themselves."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: path / file for name, file in weight_map.items()}
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ConversionError(f"No *.safetensors files in {path} (PyTorch .bin checkpoints are not "
                              "supported; re-save them with safetensors).")
    where = {}
    for file in files:
        with safe_open(file, framework="flax") as handle:
            where.update({name: file for name in handle.keys()})
    return where


# Buffers that some checkpoints carry but that are not parameters.
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


def load_hf(path: str | os.PathLike, *, param_dtype: str = "float32", scan_layers: bool = True,
            progress: bool | None = None) -> tuple[ModelConfig, dict]:
    """Read a Hugging Face Llama directory into `(ModelConfig, params)` (numpy arrays).

    Tensors are read one at a time and written into preallocated arrays of `param_dtype`, so peak
    host memory is the output plus one tensor.
    """
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ConversionError(f"{path} is not a Hugging Face model directory: no config.json.")
    cfg = config_from_hf(json.loads(config_file.read_text()), param_dtype=param_dtype,
                         scan_layers=scan_layers)
    mappings = hf_tensor_mappings(cfg)
    where = _safetensors_files(path)
    expected = {m.hf_name for m in mappings}
    missing = sorted(expected - where.keys())
    if missing:
        raise ConversionError(f"{path} lacks tensor {missing[0]}"
                              + (f" and {len(missing) - 1} more" if len(missing) > 1 else "") + ".")
    tolerated = {"lm_head.weight"} if cfg.tie_embeddings else set()
    unexpected = sorted(n for n in where.keys() - expected - tolerated
                        if not n.endswith(_IGNORED_SUFFIXES))
    if unexpected:
        raise ConversionError(f"{path} has tensor {unexpected[0]} that a Llama model with this "
                              "config.json does not have.")

    dtype = jnp.dtype(param_dtype)
    params: dict = {}
    for m in mappings:
        full_shape = ((cfg.n_layers,) + m.shape) if (m.layer is not None and cfg.scan_layers) else m.shape
        node = params
        for key in _param_path(cfg, m)[:-1]:
            node = node.setdefault(key, {})
        node.setdefault(_param_path(cfg, m)[-1], np.empty(full_shape, dtype))

    by_file: dict[Path, list[TensorMapping]] = {}
    for m in mappings:
        by_file.setdefault(where[m.hf_name], []).append(m)
    bar = tqdm(total=len(mappings), desc=f"loading {path.name}", unit="tensor",
               disable=(not progress) if progress is not None else None)
    for file, file_mappings in by_file.items():
        with safe_open(file, framework="flax") as handle:
            for m in file_mappings:
                tensor = handle.get_tensor(m.hf_name)
                if tuple(tensor.shape) != m.hf_shape:
                    raise ConversionError(f"Tensor {m.hf_name} in {file.name} has shape "
                                          f"{tuple(tensor.shape)}, but config.json implies {m.hf_shape}.")
                node = params
                for key in _param_path(cfg, m)[:-1]:
                    node = node[key]
                target = node[_param_path(cfg, m)[-1]]
                value = m.to_ours(np.asarray(tensor.astype(dtype)))
                if m.layer is not None and cfg.scan_layers:
                    target[m.layer] = value
                else:
                    target[...] = value
                del tensor, value
                bar.update()
    bar.close()
    return cfg, params
