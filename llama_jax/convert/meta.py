"""Weights in and out of Meta's own format: `params.json` plus `consolidated.NN.pth` shards.

Each shard holds one model-parallel rank's slice of every weight, as fairscale's layers in Meta's
code split it: column-parallel weights (wq, wk, wv, w1, w3, output) along dim 0, row-parallel ones
(wo, w2) along dim 1, norms replicated. The embedding depends on the codebase (`FAMILIES`): Llama
3's VocabParallelEmbedding splits the vocabulary (dim 0), the `llama` repository's
ParallelEmbedding (LLaMA 1, Llama 2, Code Llama) the model dimension (dim 1). With more shards than
key/value heads (Llama 3.1 405B in 16 shards has 8), each shard holds the one head its query heads
use, so consecutive shards hold copies of it. Merged, the tensors are Hugging Face's but for q/k,
which Meta stores in the interleaved (complex-pair) RoPE layout (`unpermute_qk`, `interleave_qk`).
The table and its sources: docs/reference.md, "Meta checkpoint layout".

PyTorch, needed for `.pth` files, is imported only when `load_meta` or `save_meta` runs.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import numpy as np
from tqdm import tqdm

from llama_jax.config import ModelConfig, RopeScaling, ffn_dim_for
from llama_jax.convert import tree
from llama_jax.convert.common import (
    ConversionError,
    atomic_directory,
    config_fields,
    read_json_object,
    readable,
)
from llama_jax.convert.hf import hf_tensor_mappings, llama3_rope_scaling
from llama_jax.convert.tree import TensorMapping

# The embedding's split axis in each codebase's shards.
FAMILIES = {"llama3": 0, "llama2": 1}

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
    "model.embed_tokens.weight": ("tok_embeddings.weight", "family"),
    "model.norm.weight": ("norm.weight", None),
    "lm_head.weight": ("output.weight", 0),
}

# LLaMA 1 and 2 checkpoints also store the RoPE frequencies, which `model.py` computes.
_IGNORED = {"rope.freqs"}
_KV = ("attention.wk.weight", "attention.wv.weight")


def meta_name(mapping: TensorMapping, family: str = "llama3") -> tuple[str, int | None]:
    """Meta's name for a Hugging Face tensor and its model-parallel split axis in `family`."""
    if mapping.layer is None:
        name, axis = _TOP_NAMES[mapping.hf_name]
        return name, FAMILIES[family] if axis == "family" else axis
    name, axis = _LAYER_NAMES[mapping.hf_name.split(".", 3)[3]]
    return f"layers.{mapping.layer}.{name}", axis


def unpermute_qk(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Meta's interleaved q/k rows -> rotate-half rows, as Hugging Face's conversion script does:
    within each head, rows (0, 1), (2, 3), ... are a rotation pair in Meta's layout; rotate-half
    pairs row j with row j + head_dim / 2."""
    rows, columns = weight.shape
    return weight.reshape(n_heads, rows // n_heads // 2, 2, columns).swapaxes(1, 2).reshape(rows, columns)


def interleave_qk(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """The inverse of `unpermute_qk`: rotate-half rows -> Meta's interleaved pairs."""
    rows, columns = weight.shape
    return weight.reshape(n_heads, 2, rows // n_heads // 2, columns).swapaxes(1, 2).reshape(rows, columns)


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


def meta_ffn_fields(dim: int, ffn_dim: int) -> dict:
    """multiple_of, and ffn_dim_multiplier if needed, that give `ffn_dim` under Meta's rule
    (`config.ffn_dim_for`): a power of two as large as will do, with no multiplier if one does
    (LLaMA 1's code knows no multiplier), else the shortest decimal."""
    hidden = int(2 * 4 * dim / 3)
    powers = [2**k for k in range(20, -1, -1) if ffn_dim % 2**k == 0]
    for multiple_of in powers:
        if ffn_dim_for(dim, multiple_of) == ffn_dim:
            return dict(multiple_of=multiple_of)
    for multiple_of in powers:
        # int(multiplier * hidden) must land in (ffn_dim - multiple_of, ffn_dim].
        low, high = (ffn_dim - multiple_of + 1) / hidden, (ffn_dim + 1) / hidden
        for digits in range(1, 10):
            lowest = math.ceil(low * 10**digits)
            for multiplier in (lowest / 10**digits, (lowest + 1) / 10**digits):  # the next: float rounding
                multiplier = round(multiplier, digits)
                if multiplier < high and ffn_dim_for(dim, multiple_of, multiplier) == ffn_dim:
                    return dict(multiple_of=multiple_of, ffn_dim_multiplier=multiplier)
    if ffn_dim_for(dim, ffn_dim) == ffn_dim:  # one multiple of the width itself
        return dict(multiple_of=ffn_dim)
    raise ConversionError(
        f"No multiple_of and ffn_dim_multiplier give ffn_dim {ffn_dim} for dim {dim} under Meta's rule, "
        "so params.json cannot describe this model."
    )


def meta_family(cfg: ModelConfig) -> str:
    """The codebase whose shard layout suits a model: Llama 3's for its tokenizer's vocabulary
    (128256), its RoPE base 500000 or Llama 3.1 scaling; else the `llama` repository's (LLaMA 1,
    Llama 2: 32000 tokens, base 10000; Code Llama: base 1000000)."""
    llama3 = cfg.vocab_size >= 128000 or cfg.rope_theta == 500000.0 or cfg.rope_scaling is not None
    return "llama3" if llama3 else "llama2"


def params_json(cfg: ModelConfig, family: str) -> dict:
    """params.json with what Meta's loaders of `family` read, and nothing they would refuse: the
    `llama` repository's ModelArgs is a plain dataclass (an unknown key is a TypeError), and
    neither codebase takes max_seq_len from it (their `build` passes its own)."""
    if cfg.head_dim * cfg.n_heads != cfg.dim:
        raise ConversionError(
            f"Meta's format has head_dim = dim / n_heads, but this model has head_dim {cfg.head_dim} "
            f"with dim {cfg.dim} and {cfg.n_heads} heads."
        )
    params = dict(dim=cfg.dim, n_layers=cfg.n_layers, n_heads=cfg.n_heads)
    if family == "llama3" or cfg.n_kv_heads != cfg.n_heads:
        params["n_kv_heads"] = cfg.n_kv_heads
    params["vocab_size"] = cfg.vocab_size
    params.update(meta_ffn_fields(cfg.dim, cfg.ffn_dim))
    params["norm_eps"] = cfg.norm_eps
    if family == "llama3" or cfg.rope_theta != 10000.0:  # Code Llama's key, unknown to Llama 2
        params["rope_theta"] = cfg.rope_theta
    if cfg.rope_scaling is not None:
        if family != "llama3":
            raise ConversionError(
                "Meta's llama2 layout has no RoPE scaling; write this Llama 3.1-style model as llama3."
            )
        params["use_scaled_rope"] = True
        if cfg.rope_scaling != RopeScaling():  # Meta's code hard-codes Llama 3.1's; we read this
            params["rope_scaling"] = dict(vars(cfg.rope_scaling), rope_type="llama3")
    return params


def _shard_files(path: Path) -> list[Path]:
    """consolidated.00.pth, consolidated.01.pth, ...: all of them, numbered without a gap."""
    numbered = {}
    for file in path.glob("consolidated.*.pth"):
        match = re.fullmatch(r"consolidated\.(\d+)\.pth", file.name)
        if match:
            numbered[int(match.group(1))] = file
    if not numbered:
        raise ConversionError(f"No consolidated.NN.pth files in {path}.")
    last = max(numbered)
    for rank in range(last + 1):
        if rank not in numbered:
            raise ConversionError(
                f"{path} lacks consolidated.{rank:02d}.pth but has consolidated.{last:02d}.pth: Meta's "
                "shards are numbered from 00 without a gap (is a shard missing, or one stray?)."
            )
    return [numbered[rank] for rank in sorted(numbered)]


def _embedding_layout(shape: tuple[int, ...], n_shards: int, dim: int) -> tuple[str, int]:
    """(family, vocabulary size) from the shape of shard 0's embedding: a slice of the vocabulary
    (rows) in Llama 3's shards, of the model dimension (columns) in the llama repository's."""
    rows, columns = shape
    if columns == dim:
        return "llama3", rows * n_shards  # one shard: either family, the whole table
    if columns * n_shards == dim:
        return "llama2", rows
    hint = ""
    if dim % columns == 0:
        hint = f" for {dim // columns} shards, but there are {n_shards} (is a shard missing, or one stray?)"
    raise ConversionError(
        f"tok_embeddings.weight in consolidated.00.pth has shape {tuple(shape)}, which is neither a "
        f"slice of the vocabulary nor of the model dimension {dim}{hint}."
    )


def _kv_copies(n_shards: int, n_kv_heads: int) -> int:
    """How many consecutive shards hold each key/value head (1: each holds its own heads)."""
    if n_shards <= n_kv_heads:
        return 1
    if n_shards % n_kv_heads:
        raise ConversionError(
            f"{n_shards} model-parallel shards cannot share out {n_kv_heads} key/value heads: "
            "Meta's layout needs one count to divide the other."
        )
    return n_shards // n_kv_heads


def _merged(shards: list[dict], name: str, axis: int | None, expected: tuple[int, ...], copies: int = 1):
    """One tensor gathered from every shard, as a numpy array (float32 if stored as bfloat16).
    Every shard's piece must have the same shape; `copies` consecutive shards hold the same piece
    (key/value heads shared out), which must be equal, or taking one would drop data."""
    import torch

    for rank, shard in enumerate(shards):
        if name not in shard:
            raise ConversionError(f"Shard consolidated.{rank:02d}.pth lacks tensor {name}.")
        if shard[name].shape != shards[0][name].shape:
            raise ConversionError(
                f"Shards disagree on the shape of {name}: {tuple(shards[0][name].shape)} in "
                f"consolidated.00.pth, {tuple(shard[name].shape)} in consolidated.{rank:02d}.pth."
            )
    if axis is None:  # replicated: shard 0's copy, as Hugging Face's converter takes it
        copies = len(shards)
    else:
        for rank in range(len(shards)):
            original = rank - rank % copies
            if rank != original and not torch.equal(shards[rank][name], shards[original][name]):
                raise ConversionError(
                    f"Shards consolidated.{original:02d}.pth and consolidated.{rank:02d}.pth hold "
                    f"different copies of {name}, which they should share."
                )
    pieces = [shard[name] for shard in shards[::copies]]
    merged = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=axis)
    if tuple(merged.shape) != expected:
        piece = pieces[0].shape[axis] if axis is not None else 0
        hint = ""
        if piece and merged.shape[axis] != expected[axis] and expected[axis] % piece == 0:
            hint = (
                f" across {len(shards)} shards, where {expected[axis] // piece} would fit"
                " (is a shard missing, or one stray?)"
            )
        raise ConversionError(
            f"Tensor {name} has shape {tuple(merged.shape)}{hint}, but params.json implies {expected}."
        )
    if merged.dtype == torch.bfloat16:  # numpy has no bfloat16 for torch to hand over
        merged = merged.float()
    return merged.numpy()


def _torch():
    """PyTorch, which reads and writes .pth files, or one sentence saying how to install it."""
    try:
        import torch
    except ImportError:
        raise ConversionError(
            "Meta's .pth checkpoints need PyTorch: pip install torch (the CPU build is enough)."
        ) from None
    return torch


def _bar(total: int, desc: str, progress: bool | None) -> tqdm:
    return tqdm(
        total=total, desc=desc, unit="tensor", disable=(not progress) if progress is not None else None
    )


def load_meta(
    path: str | os.PathLike,
    *,
    param_dtype: str = "float32",
    scan_layers: bool = True,
    rope_scaling_factor: float | None = None,
    max_seq_len: int | None = None,
    progress: bool | None = None,
) -> tuple[ModelConfig, dict]:
    """Read a Meta checkpoint directory, any number of shards of any family, into
    `(ModelConfig, params)` (numpy arrays).

    The family (how the embedding is split) is read off shard 0's embedding with params.json, and
    every tensor's shards are checked to agree. Shards are memory-mapped and each weight is merged,
    permuted and written into preallocated arrays one at a time. A checkpoint without
    `output.weight` has tied embeddings. `max_seq_len` defaults to the context length of the Llama
    version params.json looks like.
    """
    torch = _torch()
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
    if "dim" not in meta_params:
        raise ConversionError("params.json lacks 'dim'.")
    with config_fields(params_file):
        family, vocab_size = _embedding_layout(
            tuple(shards[0]["tok_embeddings.weight"].shape), len(shards), meta_params["dim"]
        )
        if isinstance(meta_params.get("vocab_size"), int) and meta_params["vocab_size"] > 0:
            vocab_size = meta_params["vocab_size"]  # LLaMA 1 and 2 say -1: the embedding's
    overrides = dict(
        param_dtype=param_dtype, scan_layers=scan_layers, tie_embeddings="output.weight" not in shards[0]
    )
    if max_seq_len is not None:
        overrides["max_seq_len"] = max_seq_len
    with config_fields(params_file):
        cfg = config_from_meta(meta_params, vocab_size, rope_scaling_factor=rope_scaling_factor, **overrides)

    mappings = hf_tensor_mappings(cfg)
    known = {meta_name(m, family)[0] for m in mappings} | _IGNORED
    for file, shard in zip(files, shards):
        unexpected = sorted(shard.keys() - known)
        if unexpected:
            raise ConversionError(
                f"{file.name} has tensor {unexpected[0]} that a Llama model "
                "with this params.json does not have."
            )
    params = tree.allocate(cfg, mappings, tree.numpy_dtype(param_dtype))
    with _bar(len(mappings), f"reading {path.name}", progress) as bar:
        for m in mappings:
            name, axis = meta_name(m, family)
            copies = _kv_copies(len(shards), cfg.n_kv_heads) if name.endswith(_KV) else 1
            tensor = _merged(shards, name, axis, m.hf_shape, copies)
            if name.endswith("attention.wq.weight"):
                tensor = unpermute_qk(tensor, cfg.n_heads)
            elif name.endswith("attention.wk.weight"):
                tensor = unpermute_qk(tensor, cfg.n_kv_heads)
            m.copy_into(tree.slot(params, cfg, m), tensor)
            del tensor
            bar.update()
    return cfg, params


def _check_splits(cfg: ModelConfig, family: str, shards: int) -> None:
    """Meta's layers need every split dimension to share out evenly, in whole heads."""
    if shards < 1:
        raise ConversionError(f"A Meta checkpoint has at least one shard, not {shards}.")
    if family not in FAMILIES:
        raise ConversionError(f"Unknown Meta family {family!r}; choose one of {', '.join(FAMILIES)}.")
    split = {"attention heads": cfg.n_heads, "FFN width": cfg.ffn_dim, "vocabulary": cfg.vocab_size}
    if family == "llama2":
        split["model dimension"] = cfg.dim  # ParallelEmbedding's columns
    for what, size in split.items():
        if size % shards:
            raise ConversionError(f"Meta's layout cannot split the {what} ({size}) into {shards} shards.")
    if shards > cfg.n_kv_heads:
        _kv_copies(shards, cfg.n_kv_heads)  # each shard a copy of one head: raises unless that fits
    elif cfg.n_kv_heads % shards:
        raise ConversionError(
            f"Meta's layout cannot split {cfg.n_kv_heads} key/value heads into {shards} shards."
        )


def _shard_slice(tensor: np.ndarray, name: str, axis: int | None, rank: int, shards: int, cfg: ModelConfig):
    """Shard `rank`'s part of a Hugging Face-layout tensor, q/k interleaved as Meta stores them."""
    if axis is None:
        return tensor
    if name.endswith(_KV) and shards > cfg.n_kv_heads:
        head = rank // (shards // cfg.n_kv_heads)  # the head this shard's query heads use
        start, size = head * cfg.head_dim, cfg.head_dim
    else:
        size = tensor.shape[axis] // shards
        start = rank * size
    piece = tensor[(slice(None),) * axis + (slice(start, start + size),)]
    if name.endswith(("attention.wq.weight", "attention.wk.weight")):  # whole heads per shard
        piece = interleave_qk(piece, piece.shape[0] // cfg.head_dim)
    return piece


def _torch_tensor(array: np.ndarray, dtype: np.dtype):
    """A torch tensor with its own copy of `array` cast to `dtype` (bfloat16 passes as bits)."""
    import torch

    array = np.array(array, dtype=dtype, order="C")  # a copy even where no cast is needed
    if dtype == tree.numpy_dtype("bfloat16"):
        return torch.from_numpy(array.view(np.uint16)).view(torch.bfloat16)
    return torch.from_numpy(array)


def save_meta(
    params: dict,
    cfg: ModelConfig,
    path: str | os.PathLike,
    *,
    shards: int = 1,
    dtype: str = "bfloat16",
    family: str | None = None,
    progress: bool | None = None,
) -> Path:
    """Write a Meta checkpoint directory that Meta's code of `family` loads with `shards`-way
    model parallelism: params.json and consolidated.00.pth ... in `dtype`.

    `family` ("llama3" or "llama2", see FAMILIES) sets how the embedding is split; by default
    `meta_family(cfg)`. Meta's models always have an output head, so tied embeddings are written
    as a copy. Host memory beyond `params` is one shard. The directory is written under a
    temporary name and renamed at the end: a failure leaves nothing at `path`.
    """
    torch = _torch()
    family = family or meta_family(cfg)
    _check_splits(cfg, family, shards)
    meta_params = params_json(cfg, family)
    mappings = hf_tensor_mappings(cfg)
    tree.check_shapes(params, cfg, mappings)
    target = tree.numpy_dtype(dtype)
    if cfg.tie_embeddings:  # output.weight = the embedding
        head = TensorMapping(
            "lm_head.weight",
            ("tok_embeddings",),
            (cfg.vocab_size, cfg.dim),
            (cfg.vocab_size, cfg.dim),
            linear=False,
        )
        mappings = mappings + [head]
    path = Path(path)
    with (
        atomic_directory(path) as partial,
        _bar(shards * len(mappings), f"writing {path.name}", progress) as bar,
    ):
        for rank in range(shards):
            shard = {}
            for m in mappings:
                name, axis = meta_name(m, family)
                piece = _shard_slice(m.to_hf(tree.fetch(params, cfg, m)), name, axis, rank, shards, cfg)
                shard[name] = _torch_tensor(piece, target)
                bar.update()
            torch.save(shard, partial / f"consolidated.{rank:02d}.pth")
            del shard
        (partial / "params.json").write_text(json.dumps(meta_params, indent=2) + "\n")
    return path
