"""`python -m llama_jax.convert --from KIND SRC --to KIND DST`: one checkpoint format to another.

Examples:
    python -m llama_jax.convert --from hf Llama-3.2-1B --to llama_jax ckpt/llama3_2_1b
    python -m llama_jax.convert --from meta Llama3.1-8B --to llama_jax ckpt/llama3_1_8b
    python -m llama_jax.convert --from llama_jax ckpt/run --to hf out/hf --dtype bfloat16
    python -m llama_jax.convert --from hf Llama-3.1-8B --to meta out/meta --shards 2
    python -m llama_jax.convert --from hf Llama-3.2-1B --to hf out/merged --merge-lora my-adapter

Sources: `hf` (config.json + safetensors), `meta` (params.json + consolidated.NN.pth), `llama_jax`
(a parameters checkpoint from `checkpoint.save_params`). Destinations: `llama_jax`, `hf`, `meta`
(in `--shards` model-parallel shards, bfloat16 unless `--dtype` says otherwise). `--merge-lora`
folds a PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors, see peft.py)
into the source's weights before they are written: a plain model with the adapters built in.
A bad input is one sentence on stderr and exit status 1.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import jax
import numpy as np

from llama_jax.checkpoint import CheckpointError, load_for_inference, save_params
from llama_jax.config import ModelConfig
from llama_jax.convert import tree
from llama_jax.convert.common import ConversionError, check_tokenizer_fits, require_empty_destination
from llama_jax.convert.hf import hf_tensor_mappings, load_hf, save_hf
from llama_jax.convert.meta import FAMILIES, load_meta, save_meta
from llama_jax.convert.peft import merge_peft_into, read_peft_config
from llama_jax.tokenizer import load_tokenizer

SOURCES = ("hf", "meta", "llama_jax")
DESTINATIONS = ("llama_jax", "hf", "meta")


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


def source_tokenizer(source_kind: str, path: str | os.PathLike) -> str | None:
    """The tokenizer that belongs to a checkpoint, if it has one: a Hugging Face or Meta
    directory's own files (`tokenizer.model`, `original/tokenizer.model`, or the directory itself
    when it holds only `tokenizer.json`), or the one a llama_jax run recorded (or an export holds
    beside its parameters)."""
    path = Path(path)
    if source_kind == "llama_jax":
        for record in (path / "experiment.json", path.parent.parent / "experiment.json"):  # workdir, STEP
            if record.is_file():
                recorded = json.loads(record.read_text()).get("data", {}).get("tokenizer_path")
                if recorded:
                    if not Path(recorded).exists():
                        raise ConversionError(
                            f"{record} names the tokenizer {recorded}, which no longer exists; pass "
                            "the one the checkpoint was trained with (--tokenizer, or data.tokenizer_path)."
                        )
                    return recorded
    for candidate in ("tokenizer.model", "original/tokenizer.model"):
        if (path / candidate).is_file():
            return str(path / candidate)
    return str(path) if (path / "tokenizer.json").is_file() else None


def copy_tokenizer(tokenizer_path: str, destination: Path) -> None:
    """Puts a tokenizer beside a written checkpoint, where `source_tokenizer` finds it."""
    source = Path(tokenizer_path)
    if source.is_file():
        shutil.copy(source, destination / "tokenizer.model")
        return
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (source / name).is_file():
            shutil.copy(source / name, destination / name)


def write_params(
    destination_kind: str,
    params: dict,
    cfg: ModelConfig,
    path: str | os.PathLike,
    *,
    max_shard_size: int | str = "5GB",
    shards: int = 1,
    dtype: str | None = None,
    family: str | None = None,
    tokenizer=None,
    progress: bool | None = None,
) -> Path:
    """Writes `params` as a checkpoint of `destination_kind` (one of DESTINATIONS) in their
    own dtype, but for meta: `shards` files of `dtype` (default bfloat16, as Meta's are), the
    embedding split as `family` does (see `meta.save_meta`). A `tokenizer` (llama_jax.tokenizer.
    Tokenizer) goes with them: its files and chat template for hf (see hf_tokenizer.py), its file
    beside the weights for llama_jax and meta."""
    path = Path(path)
    require_empty_destination(path)
    check_tokenizer_fits(tokenizer, cfg.vocab_size)
    if destination_kind == "hf":
        return save_hf(
            params, cfg, path, max_shard_size=max_shard_size, tokenizer=tokenizer, progress=progress
        )
    if destination_kind == "llama_jax":
        written = save_params(
            path, params, cfg.replace(param_dtype=np.asarray(params["tok_embeddings"]).dtype.name)
        )
    elif destination_kind == "meta":
        written = save_meta(
            params, cfg, path, shards=shards, dtype=dtype or "bfloat16", family=family, progress=progress
        )
    else:
        raise ConversionError(f"Unknown destination kind {destination_kind!r}; choose one of {DESTINATIONS}.")
    if tokenizer is not None:
        copy_tokenizer(tokenizer.path, Path(written))
    return written


def _bytes_under(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _parser() -> argparse.ArgumentParser:
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
        help="dtype of the written weights (default: bfloat16 for --to meta, else float32 when "
        "reading hf or meta, the checkpoint's own for llama_jax)",
    )
    parser.add_argument(
        "--max-shard-size", default="5GB", help="largest safetensors file written for --to hf (default 5GB)"
    )
    parser.add_argument(
        "--shards", type=int, default=1, help="model-parallel shards written for --to meta (default 1)"
    )
    parser.add_argument(
        "--meta-family",
        choices=tuple(FAMILIES),
        help="embedding split for --to meta: llama3 by vocabulary (Meta's llama3 and llama-models "
        "code), llama2 by model dimension (the llama repository: LLaMA 1, Llama 2, Code Llama); "
        "default: llama3 for a model with Llama 3's vocabulary size or RoPE, else llama2",
    )
    parser.add_argument(
        "--rope-scaling-factor",
        type=float,
        help="Llama 3.1 RoPE scaling factor for a Meta checkpoint with "
        "use_scaled_rope (default 8; Llama 3.2 1B/3B used 32)",
    )
    parser.add_argument(
        "--tokenizer",
        help="the tokenizer written with the weights (default: the source's own, or the one its run "
        "recorded); --no-tokenizer writes the weights alone",
    )
    parser.add_argument("--no-tokenizer", action="store_true", help="write no tokenizer files")
    parser.add_argument(
        "--merge-lora",
        metavar="DIR",
        help="a PEFT LoRA adapter directory (adapter_config.json, adapter_model.safetensors) of the "
        "source model, folded into its weights (W + lora_alpha / r A B) before they are written",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    (source_kind, source), (destination_kind, destination) = args.source, args.destination
    if source_kind not in SOURCES:
        parser.error(f"--from takes one of {', '.join(SOURCES)}, not {source_kind!r}")
    if destination_kind not in DESTINATIONS:
        parser.error(f"--to takes one of {', '.join(DESTINATIONS)}, not {destination_kind!r}")
    if destination_kind != "meta" and (args.shards != 1 or args.meta_family):
        parser.error("--shards and --meta-family apply to --to meta only")
    if args.shards < 1:
        parser.error(f"--shards takes a count of at least 1, not {args.shards}")

    progress = False if args.no_progress else None
    try:
        require_empty_destination(Path(destination))  # before the (long) read
        if args.merge_lora:
            read_peft_config(args.merge_lora)  # likewise: a bad adapter directory fails at once
        tokenizer = None
        if not args.no_tokenizer:
            tokenizer_path = args.tokenizer or source_tokenizer(source_kind, source)
            if tokenizer_path is not None:
                tokenizer = load_tokenizer(tokenizer_path)
        cfg, params = read_params(
            source_kind,
            source,
            dtype=args.dtype,
            rope_scaling_factor=args.rope_scaling_factor,
            progress=progress,
        )
        if args.merge_lora:
            params = merge_peft_into(params, cfg, args.merge_lora)
        written = write_params(
            destination_kind,
            params,
            cfg,
            destination,
            max_shard_size=args.max_shard_size,
            shards=args.shards,
            dtype=args.dtype,
            family=args.meta_family,
            tokenizer=tokenizer,
            progress=progress,
        )
    except (ValueError, OSError) as err:  # ConversionError and CheckpointError are ValueErrors
        print(f"error: {err}", file=sys.stderr)
        return 1
    if tokenizer is None and not args.no_tokenizer:
        print(
            f"warning: {source} has no tokenizer and none was given (--tokenizer); the weights were "
            "written without one.",
            file=sys.stderr,
        )
    n_params = sum(int(np.size(leaf)) for leaf in jax.tree.leaves(params))
    merged = f" with the LoRA adapters of {args.merge_lora} merged" if args.merge_lora else ""
    print(
        f"Converted {len(hf_tensor_mappings(cfg))} tensors, {n_params:,} parameters{merged}: "
        f"{_bytes_under(Path(written)):,} bytes written to {written}."
    )
    return 0
