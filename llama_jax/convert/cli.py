"""`python -m llama_jax.convert --from KIND SRC --to KIND DST`: one checkpoint format to another.

Examples:
    python -m llama_jax.convert --from hf Llama-3.2-1B --to llama_jax ckpt/llama3_2_1b
    python -m llama_jax.convert --from meta Llama3.1-8B --to llama_jax ckpt/llama3_1_8b
    python -m llama_jax.convert --from llama_jax ckpt/run --to hf out/hf --dtype bfloat16

Sources: `hf` (config.json + safetensors), `meta` (params.json + consolidated.NN.pth), `llama_jax`
(a parameters checkpoint from `checkpoint.save_params`). Destinations: `llama_jax`, `hf`.
A bad input is one sentence on stderr and exit status 1.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import jax
import numpy as np

from llama_jax.checkpoint import CheckpointError, load_for_inference, save_params
from llama_jax.config import ModelConfig
from llama_jax.convert import tree
from llama_jax.convert.common import ConversionError, require_empty_destination
from llama_jax.convert.hf import hf_tensor_mappings, load_hf, save_hf
from llama_jax.convert.meta import load_meta

SOURCES = ("hf", "meta", "llama_jax")
DESTINATIONS = ("llama_jax", "hf")


def read_params(
    source_kind: str,
    path: str | os.PathLike,
    *,
    dtype: str | None = None,
    rope_scaling_factor: float | None = None,
    progress: bool | None = None,
) -> tuple[ModelConfig, dict]:
    """(ModelConfig, params) from a checkpoint of `source_kind` (one of SOURCES), as numpy arrays
    of `dtype` (default: float32 for hf and meta, as stored for llama_jax)."""
    path = Path(path)
    if not path.exists():
        raise ConversionError(f"The source {path} does not exist.")
    if source_kind == "hf":
        return load_hf(path, param_dtype=dtype or "float32", progress=progress)
    if source_kind == "meta":
        return load_meta(
            path, param_dtype=dtype or "float32", rope_scaling_factor=rope_scaling_factor, progress=progress
        )
    if source_kind == "llama_jax":
        # A parameters checkpoint, or a training workdir / checkpoints/STEP (its parameters,
        # not the optimizer state): the params-only export for inference.
        try:
            cfg, params = load_for_inference(path)
        except CheckpointError as err:
            raise ConversionError(str(err)) from None
        if dtype is not None:
            params = jax.tree.map(lambda a: np.asarray(a).astype(tree.numpy_dtype(dtype)), params)
            cfg = cfg.replace(param_dtype=tree.numpy_dtype(dtype).name)
        return cfg, params
    raise ConversionError(f"Unknown source kind {source_kind!r}; choose one of {SOURCES}.")


def write_params(
    destination_kind: str,
    params: dict,
    cfg: ModelConfig,
    path: str | os.PathLike,
    *,
    max_shard_size: int | str = "5GB",
    progress: bool | None = None,
) -> Path:
    """Writes `params` as a checkpoint of `destination_kind` (one of DESTINATIONS) in their
    own dtype."""
    path = Path(path)
    require_empty_destination(path)
    if destination_kind == "llama_jax":
        dtype = np.asarray(params["tok_embeddings"]).dtype.name
        return save_params(path, params, cfg.replace(param_dtype=dtype))
    if destination_kind == "hf":
        return save_hf(params, cfg, path, max_shard_size=max_shard_size, progress=progress)
    raise ConversionError(f"Unknown destination kind {destination_kind!r}; choose one of {DESTINATIONS}.")


def _bytes_under(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m llama_jax.convert",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Convert Llama weights between the Hugging Face, Meta and llama_jax formats.",
        epilog=__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument(
        "--from",
        dest="source",
        nargs=2,
        metavar=("KIND", "SRC"),
        required=True,
        help=f"source kind ({', '.join(SOURCES)}) and path",
    )
    parser.add_argument(
        "--to",
        dest="destination",
        nargs=2,
        metavar=("KIND", "DST"),
        required=True,
        help=f"destination kind ({', '.join(DESTINATIONS)}) and a new directory",
    )
    parser.add_argument(
        "--dtype",
        choices=("bfloat16", "float32"),
        help="dtype of the written weights (default: float32 when reading hf or "
        "meta, the checkpoint's own for llama_jax)",
    )
    parser.add_argument(
        "--max-shard-size", default="5GB", help="largest safetensors file written for --to hf (default 5GB)"
    )
    parser.add_argument(
        "--rope-scaling-factor",
        type=float,
        help="Llama 3.1 RoPE scaling factor for a Meta checkpoint with "
        "use_scaled_rope (default 8; Llama 3.2 1B/3B used 32)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    (source_kind, source), (destination_kind, destination) = args.source, args.destination
    if source_kind not in SOURCES:
        parser.error(f"--from takes one of {', '.join(SOURCES)}, not {source_kind!r}")
    if destination_kind not in DESTINATIONS:
        parser.error(f"--to takes one of {', '.join(DESTINATIONS)}, not {destination_kind!r}")

    progress = False if args.no_progress else None
    try:
        require_empty_destination(Path(destination))  # before the (long) read
        cfg, params = read_params(
            source_kind,
            source,
            dtype=args.dtype,
            rope_scaling_factor=args.rope_scaling_factor,
            progress=progress,
        )
        written = write_params(
            destination_kind, params, cfg, destination, max_shard_size=args.max_shard_size, progress=progress
        )
    except (ValueError, OSError) as err:  # ConversionError and CheckpointError are ValueErrors
        print(f"error: {err}", file=sys.stderr)
        return 1
    n_params = sum(int(np.size(leaf)) for leaf in jax.tree.leaves(params))
    print(
        f"Converted {len(hf_tensor_mappings(cfg))} tensors, {n_params:,} parameters: "
        f"{_bytes_under(Path(written)):,} bytes written to {written}."
    )
    return 0
