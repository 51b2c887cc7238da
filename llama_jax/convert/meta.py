"""Weights in from Meta's own format: `params.json` plus `consolidated.NN.pth` shards.

Each shard holds one model-parallel rank's slice of every weight: column-parallel weights (wq, wk,
wv, w1, w3, output) are split along dim 0, row-parallel ones (wo, w2) along dim 1, the embedding
along dim 1 (ParallelEmbedding splits the embedding dim), and norms are replicated. Merged, the
tensors are Hugging Face's but for q/k, which Meta stores in the interleaved (complex-pair) RoPE
layout; `unpermute_qk` brings them to the rotate-half layout of Hugging Face and `model.py`.

Reading `.pth` files needs PyTorch, imported only when `load_meta` runs.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
from tqdm import tqdm

from llama_jax.config import ModelConfig, RopeScaling, ffn_dim_for
from llama_jax.convert import tree
from llama_jax.convert.common import ConversionError, config_fields, read_json_object, readable
from llama_jax.convert.hf import hf_tensor_mappings, llama3_rope_scaling
from llama_jax.convert.tree import TensorMapping

# Hugging Face name (per layer, after "model.layers.N.") -> Meta name and the axis along which
# model-parallel shards split it (None: replicated).
_LAYER_NAMES = {
    "self_attn.q_proj.weight": ("attention.wq.weight", 0),
    "self_attn.k_proj.weight": ("attention.wk.weight", 0),
    "self_attn.v_proj.weight": ("attention.wv.weight", 0),
    "self_attn.o_proj.weight": ("attention.wo.weight", 1),
    "mlp.gate_proj.weight": ("feed_forward.w1.weight", 0),
    "mlp.up_proj.weight": ("feed_forward.w3.weight", 0),
    "mlp.down_proj.weight": ("feed_forward.w2.weight", 1),
    "input_layernorm.weight": ("attention_norm.weight", None),
    "post_attention_layernorm.weight": ("ffn_norm.weight", None),
}
_TOP_NAMES = {
    "model.embed_tokens.weight": ("tok_embeddings.weight", 1),
    "model.norm.weight": ("norm.weight", None),
    "lm_head.weight": ("output.weight", 0),
}

# LLaMA 1 and 2 checkpoints also store the RoPE frequencies, which `model.py` computes.
_IGNORED = {"rope.freqs"}


def meta_name(mapping: TensorMapping) -> tuple[str, int | None]:
    """Meta's name for a Hugging Face tensor and its model-parallel split axis."""
    if mapping.layer is None:
        return _TOP_NAMES[mapping.hf_name]
    name, axis = _LAYER_NAMES[mapping.hf_name.split(".", 3)[3]]
    return f"layers.{mapping.layer}.{name}", axis


def unpermute_qk(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Meta's interleaved q/k rows -> rotate-half rows, as Hugging Face's conversion script does:
    within each head, rows (0, 1), (2, 3), ... are a rotation pair in Meta's layout; rotate-half
    pairs row j with row j + head_dim / 2."""
    rows, columns = weight.shape
    return weight.reshape(n_heads, rows // n_heads // 2, 2, columns).swapaxes(1, 2).reshape(rows, columns)


def _default_max_seq_len(params: dict, scaled: bool) -> int:
    """params.json does not record the context length; the family's, guessed from the version."""
    if scaled:
        return 131072  # Llama 3.1 / 3.2
    if params.get("rope_theta", 10000.0) >= 500000.0:
        return 8192  # Llama 3
    return 2048 if params.get("vocab_size", -1) == -1 else 4096  # LLaMA 1 / Llama 2


def config_from_meta(
    params: dict, vocab_size: int, *, rope_scaling_factor: float | None = None, **overrides
) -> ModelConfig:
    """A ModelConfig from Meta's params.json; `vocab_size` comes from the embedding when
    params.json says -1 (LLaMA 1). `rope_scaling_factor` replaces the scaling factor
    (use_scaled_rope means Llama 3.1's factor 8; Llama 3.2 1B/3B used 32)."""
    try:
        dim, n_heads = params["dim"], params["n_heads"]
        if params.get("rope_scaling"):
            scaling = llama3_rope_scaling(params["rope_scaling"])
        elif params.get("use_scaled_rope"):
            scaling = RopeScaling(factor=8.0)
        else:
            scaling = None
        if scaling is not None and rope_scaling_factor is not None:
            scaling = RopeScaling(
                rope_scaling_factor,
                scaling.low_freq_factor,
                scaling.high_freq_factor,
                scaling.original_max_position_embeddings,
            )
        fields = dict(
            dim=dim,
            n_layers=params["n_layers"],
            n_heads=n_heads,
            n_kv_heads=params.get("n_kv_heads") or n_heads,
            head_dim=dim // n_heads,
            ffn_dim=ffn_dim_for(dim, params["multiple_of"], params.get("ffn_dim_multiplier")),
            vocab_size=vocab_size,
            max_seq_len=params.get("max_seq_len") or _default_max_seq_len(params, bool(scaling)),
            rope_theta=float(params.get("rope_theta", 10000.0)),
            rope_scaling=scaling,
            norm_eps=float(params["norm_eps"]),
        )
    except KeyError as missing:
        raise ConversionError(f"params.json lacks {missing}.") from None
    fields.update(overrides)
    return ModelConfig(**fields)


def _shard_files(path: Path) -> list[Path]:
    """consolidated.00.pth, consolidated.01.pth, ...: all of them, numbered without a gap."""
    numbered = {}
    for file in path.glob("consolidated.*.pth"):
        match = re.fullmatch(r"consolidated\.(\d+)\.pth", file.name)
        if match:
            numbered[int(match.group(1))] = file
    if not numbered:
        raise ConversionError(f"No consolidated.NN.pth files in {path}.")
    for rank in range(max(numbered) + 1):
        if rank not in numbered:
            raise ConversionError(
                f"{path} lacks consolidated.{rank:02d}.pth, one of the "
                f"{max(numbered) + 1} model-parallel shards."
            )
    return [numbered[rank] for rank in sorted(numbered)]


def _merged(shards: list[dict], name: str, axis: int | None, expected: tuple[int, ...]):
    """One tensor gathered from every shard, as a numpy array (float32 if stored as bfloat16)."""
    import torch

    pieces = []
    for rank, shard in enumerate(shards):
        if name not in shard:
            raise ConversionError(f"Shard consolidated.{rank:02d}.pth lacks tensor {name}.")
        pieces.append(shard[name])
        if axis is None:
            break  # replicated in every shard
    merged = pieces[0] if axis is None else torch.cat(pieces, dim=axis)
    if tuple(merged.shape) != expected:
        # A whole fraction of the expected size is what a missing last shard looks like.
        fraction = (
            axis is not None
            and merged.shape[axis] < expected[axis]
            and (expected[axis] % merged.shape[axis] == 0)
        )
        hint = f" across {len(shards)} shards (is a shard missing?)" if fraction else ""
        raise ConversionError(
            f"Tensor {name} has shape {tuple(merged.shape)}{hint}, but params.json implies {expected}."
        )
    if merged.dtype == torch.bfloat16:  # numpy has no bfloat16 for torch to hand over
        merged = merged.float()
    return merged.numpy()


def load_meta(
    path: str | os.PathLike,
    *,
    param_dtype: str = "float32",
    scan_layers: bool = True,
    rope_scaling_factor: float | None = None,
    max_seq_len: int | None = None,
    progress: bool | None = None,
) -> tuple[ModelConfig, dict]:
    """Read a Meta checkpoint directory into `(ModelConfig, params)` (numpy arrays).

    Shards are memory-mapped and each weight is merged, permuted and written into preallocated
    arrays one at a time. A checkpoint without `output.weight` has tied embeddings.
    `max_seq_len` defaults to the context length of the Llama version params.json looks like.
    """
    try:
        import torch
    except ImportError:
        raise ConversionError(
            "Reading Meta .pth checkpoints needs PyTorch: pip install torch (the CPU build is enough)."
        ) from None
    path = Path(path)
    params_file = path / "params.json"
    if not params_file.is_file():
        raise ConversionError(f"{path} is not a Meta checkpoint directory: no params.json.")
    meta_params = read_json_object(params_file)
    files = _shard_files(path)
    shards = []
    for file in files:
        with readable(file, "PyTorch checkpoint"):
            shards.append(torch.load(file, map_location="cpu", mmap=True, weights_only=True))
    if "tok_embeddings.weight" not in shards[0]:
        raise ConversionError(f"{files[0].name} lacks tensor tok_embeddings.weight.")
    vocab_size = meta_params.get("vocab_size", -1)
    if not isinstance(vocab_size, int) or vocab_size <= 0:
        vocab_size = shards[0]["tok_embeddings.weight"].shape[0]
    overrides = dict(
        param_dtype=param_dtype, scan_layers=scan_layers, tie_embeddings="output.weight" not in shards[0]
    )
    if max_seq_len is not None:
        overrides["max_seq_len"] = max_seq_len
    with config_fields(params_file):
        cfg = config_from_meta(meta_params, vocab_size, rope_scaling_factor=rope_scaling_factor, **overrides)

    mappings = hf_tensor_mappings(cfg)
    unexpected = sorted(shards[0].keys() - {meta_name(m)[0] for m in mappings} - _IGNORED)
    if unexpected:
        raise ConversionError(
            f"{files[0].name} has tensor {unexpected[0]} that a Llama model "
            "with this params.json does not have."
        )
    params = tree.allocate(cfg, mappings, tree.numpy_dtype(param_dtype))
    with tqdm(
        total=len(mappings),
        desc=f"reading {path.name}",
        unit="tensor",
        disable=(not progress) if progress is not None else None,
    ) as bar:
        for m in mappings:
            name, axis = meta_name(m)
            tensor = _merged(shards, name, axis, m.hf_shape)
            if name.endswith("attention.wq.weight"):
                tensor = unpermute_qk(tensor, cfg.n_heads)
            elif name.endswith("attention.wk.weight"):
                tensor = unpermute_qk(tensor, cfg.n_kv_heads)
            m.copy_into(tree.slot(params, cfg, m), tensor)
            del tensor
            bar.update()
    return cfg, params
