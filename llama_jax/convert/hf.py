"""Weights in and out of the Hugging Face format.

`load_hf(path) -> (ModelConfig, params)` reads a Hugging Face Llama directory (config.json plus
safetensors, sharded or not) and `save_hf(params, cfg, path)` writes one, tensor by tensor and
without PyTorch. Hugging Face checkpoints store q/k in the rotate-half RoPE layout, which is the
layout `model.py` uses, so no permutation is needed; every linear weight is transposed between
torch's [out, in] and our [in, ...out] layout.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file
from tqdm import tqdm

from llama_jax.config import ModelConfig, RopeScaling
from llama_jax.convert import tree
from llama_jax.convert.common import (
    ConversionError,
    atomic_directory,
    check_tokenizer_fits,
    config_fields,
    read_json_object,
    readable,
    require_empty_destination,
)
from llama_jax.convert.hf_tokenizer import generation_config, save_hf_tokenizer
from llama_jax.convert.tree import TensorMapping


def llama3_rope_scaling(rope: dict) -> RopeScaling:
    """Llama 3.1 scaling from a `rope_scaling` dict (Hugging Face and Meta spell it alike)."""
    try:
        return RopeScaling(
            factor=float(rope["factor"]),
            low_freq_factor=float(rope["low_freq_factor"]),
            high_freq_factor=float(rope["high_freq_factor"]),
            original_max_position_embeddings=int(rope["original_max_position_embeddings"]),
        )
    except KeyError as missing:
        raise ConversionError(f"The rope_scaling entry lacks {missing}.") from None


def config_from_hf(hf: dict, **overrides) -> ModelConfig:
    """A ModelConfig from a Hugging Face Llama config.json (transformers 4 or 5 style)."""
    if hf.get("model_type", "llama") != "llama":
        raise ConversionError(
            f"config.json has model_type {hf.get('model_type')!r}; only 'llama' checkpoints are supported."
        )
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
        scaling = llama3_rope_scaling(rope)
    else:
        raise ConversionError(
            f"config.json asks for RoPE scaling of type {rope_type!r}; only "
            "the default and Llama 3.1's 'llama3' type are supported."
        )
    try:
        n_heads = hf["num_attention_heads"]
        fields = dict(
            dim=hf["hidden_size"],
            n_layers=hf["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=hf.get("num_key_value_heads") or n_heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // n_heads,
            ffn_dim=hf["intermediate_size"],
            vocab_size=hf["vocab_size"],
            max_seq_len=hf.get("max_position_embeddings", 2048),
            rope_theta=float(theta),
            rope_scaling=scaling,
            norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        )
    except KeyError as missing:
        raise ConversionError(f"config.json lacks {missing}.") from None
    fields.update(overrides)
    return ModelConfig(**fields)


def config_to_hf(cfg: ModelConfig, dtype: str) -> dict:
    """config.json in the style of the released checkpoints, which transformers 4 and 5 read."""
    scaling = cfg.rope_scaling
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None
        if scaling is None
        else {
            "rope_type": "llama3",
            "factor": scaling.factor,
            "low_freq_factor": scaling.low_freq_factor,
            "high_freq_factor": scaling.high_freq_factor,
            "original_max_position_embeddings": scaling.original_max_position_embeddings,
        },
        "tie_word_embeddings": cfg.tie_embeddings,
        "vocab_size": cfg.vocab_size,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": cfg.init_std,
        "pretraining_tp": 1,
        "use_cache": True,
        "torch_dtype": dtype,
    }


def hf_tensor_mappings(cfg: ModelConfig) -> list[TensorMapping]:
    """Every tensor of a Hugging Face LlamaForCausalLM with our path and shape for it."""
    d, f, v = cfg.dim, cfg.ffn_dim, cfg.vocab_size
    h, k, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    out = [
        TensorMapping("model.embed_tokens.weight", ("tok_embeddings",), (v, d), (v, d), linear=False),
        TensorMapping("model.norm.weight", ("norm", "weight"), (d,), (d,), linear=False),
    ]
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
        out += [
            TensorMapping(f"model.layers.{i}.{name}", path, hf_shape, shape, layer=i, linear=len(shape) > 1)
            for name, path, hf_shape, shape in per_layer
        ]
    return out


def _safetensors_files(path: Path) -> dict[str, Path]:
    """Tensor name -> file, from the index of a sharded checkpoint or the files themselves."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = {name: path / file for name, file in weight_map.items()}
        absent = sorted({file.name for file in files.values() if not file.is_file()})
        if absent:
            raise ConversionError(
                f"{path} lacks {absent[0]}, a shard its model.safetensors.index.json lists."
            )
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ConversionError(
            f"No *.safetensors files in {path} (PyTorch .bin checkpoints are "
            "not supported; re-save them with safetensors)."
        )
    where = {}
    for file in files:
        with readable(file, "safetensors"), safe_open(file, framework="np") as handle:
            where.update({name: file for name in handle.keys()})
    return where


# Buffers that some checkpoints carry but that are not parameters.
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


def read_hf_config(path: Path) -> dict:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ConversionError(f"{path} is not a Hugging Face model directory: no config.json.")
    return read_json_object(config_file)


def load_hf(
    path: str | os.PathLike,
    *,
    param_dtype: str = "float32",
    scan_layers: bool = True,
    progress: bool | None = None,
) -> tuple[ModelConfig, dict]:
    """Read a Hugging Face Llama directory into `(ModelConfig, params)` (numpy arrays).

    Tensors are read one at a time (with pread, not a memory map, so the file does not add to
    the process's resident memory) and written into preallocated arrays of `param_dtype`: peak
    host memory is the output plus one tensor.
    """
    path = Path(path)
    with config_fields(path / "config.json"):
        cfg = config_from_hf(read_hf_config(path), param_dtype=param_dtype, scan_layers=scan_layers)
    mappings = hf_tensor_mappings(cfg)
    where = _safetensors_files(path)
    expected = {m.hf_name for m in mappings}
    missing = sorted(expected - where.keys())
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise ConversionError(f"{path} lacks tensor {missing[0]}{more}.")
    tolerated = {"lm_head.weight"} if cfg.tie_embeddings else set()
    unexpected = sorted(n for n in where.keys() - expected - tolerated if not n.endswith(_IGNORED_SUFFIXES))
    if unexpected:
        raise ConversionError(
            f"{path} has tensor {unexpected[0]} that a Llama model with this config.json does not have."
        )

    params = tree.allocate(cfg, mappings, tree.numpy_dtype(param_dtype))
    by_file: dict[Path, list[TensorMapping]] = {}
    for m in mappings:
        by_file.setdefault(where[m.hf_name], []).append(m)
    with tqdm(
        total=len(mappings),
        desc=f"reading {path.name}",
        unit="tensor",
        disable=(not progress) if progress is not None else None,
    ) as bar:
        for file, file_mappings in by_file.items():
            with readable(file, "safetensors"), safe_open(file, framework="np", backend="pread") as handle:
                for m in file_mappings:
                    tensor = handle.get_tensor(m.hf_name)
                    if tuple(tensor.shape) != m.hf_shape:
                        raise ConversionError(
                            f"Tensor {m.hf_name} in {file.name} has shape {tuple(tensor.shape)}, "
                            f"but config.json implies {m.hf_shape}."
                        )
                    m.copy_into(tree.slot(params, cfg, m), tensor)
                    del tensor
                    bar.update()
    return cfg, params


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string such as "5GB", "500MB", "40KB" or "2GiB"."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMGT]?)(I?)B?", size.strip().upper())
    if not match:
        raise ConversionError(f"Cannot read {size!r} as a size; write e.g. 5GB or 500MB.")
    number, prefix, binary = match.groups()
    base = 1024 if binary else 1000
    return int(float(number) * base ** " KMGT".index(prefix or " "))


def _plan_shards(mappings: list[TensorMapping], itemsize: int, max_bytes: int) -> list[list[TensorMapping]]:
    """Consecutive tensors grouped into files of at most `max_bytes` (a larger tensor alone)."""
    shards: list[list[TensorMapping]] = [[]]
    size = 0
    for m in mappings:
        nbytes = int(np.prod(m.hf_shape)) * itemsize
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(m)
        size += nbytes
    return shards


def save_hf(
    params: dict,
    cfg: ModelConfig,
    path: str | os.PathLike,
    *,
    max_shard_size: int | str = "5GB",
    dtype: str | None = None,
    tokenizer=None,
    progress: bool | None = None,
) -> Path:
    """Write a Hugging Face Llama directory that `LlamaForCausalLM.from_pretrained` loads.

    config.json, safetensors files of at most `max_shard_size` and model.safetensors.index.json;
    with a `tokenizer` (a `llama_jax.tokenizer.Tokenizer`), also its files, the chat template
    and generation_config.json, so that `AutoTokenizer` and `pipeline` use the directory as is
    (see hf_tokenizer.py). `dtype` (e.g. "bfloat16") defaults to that of the parameters. Host
    memory beyond `params` is one file's worth of tensors. `path` must be absent or empty.
    """
    final = Path(path)
    require_empty_destination(final)
    check_tokenizer_fits(tokenizer, cfg.vocab_size)
    mappings = hf_tensor_mappings(cfg)
    tree.check_shapes(params, cfg, mappings)
    with atomic_directory(final) as path:
        _write_hf(params, cfg, path, mappings, dtype, max_shard_size, tokenizer, progress)
    return final


def _write_hf(params, cfg, path: Path, mappings, dtype, max_shard_size, tokenizer, progress) -> None:
    dtype = tree.numpy_dtype(dtype or np.asarray(params["tok_embeddings"]).dtype)
    shards = _plan_shards(mappings, dtype.itemsize, parse_size(max_shard_size))
    weight_map, total = {}, 0
    with tqdm(
        total=len(mappings),
        desc=f"writing {path.name}",
        unit="tensor",
        disable=(not progress) if progress is not None else None,
    ) as bar:
        for number, shard in enumerate(shards, start=1):
            name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
            tensors = {}
            for m in shard:
                tensor = m.to_hf(tree.fetch(params, cfg, m))
                tensors[m.hf_name] = np.ascontiguousarray(tensor, dtype=dtype)
                weight_map[m.hf_name] = name
                total += tensors[m.hf_name].nbytes
                bar.update()
            save_file(tensors, path / name, metadata={"format": "pt"})
            del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    hf_config = config_to_hf(cfg, dtype.name)
    if tokenizer is not None:
        special_ids = save_hf_tokenizer(tokenizer, path, max_seq_len=cfg.max_seq_len)
        hf_config.update(special_ids)
        generation = generation_config(special_ids)
        (path / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    (path / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
