"""What `init_from` names: the parameters a run starts from, and with them the model's architecture
and tokenizer.

A source is a Hugging Face directory (config.json and .safetensors files, as downloaded), a Meta
directory (params.json and consolidated.NN.pth shards), a llama_jax parameters checkpoint
(`checkpoint.save_params`, `python -m llama_jax.convert`) or a training workdir (its newest
checkpoint that verifies, or one of its checkpoints/STEP). Every stage starts from it the same
way: its parameters, a fresh optimizer; `model=from_init` (Experiment.architecture_from_init)
takes the architecture from the source, otherwise the source must have the experiment's.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import numpy as np

from llama_jax import lora as lora_lib
from llama_jax.checkpoint import (
    MODEL_CONFIG_FILE,
    CheckpointError,
    is_lora_run,
    load_adapters,
    load_for_inference,
)
from llama_jax.config import (
    ARCHITECTURE_FIELDS,
    ConfigError,
    ModelConfig,
    architecture_differences,
    model_config_from_dict,
)
from llama_jax.convert import ConversionError, config_from_hf, config_from_meta, load_hf, load_meta
from llama_jax.convert.cli import source_tokenizer as tokenizer_of
from llama_jax.convert.common import config_fields, read_json_object, readable

KINDS = ("hf", "meta", "llama_jax")
# What `model=from_init` takes from the source: every field that decides what the parameters
# compute, and the context length it was trained for. How the run computes (dtypes, remat,
# scanned layers, the attention kernel) stays the experiment's.
SOURCE_FIELDS = tuple(f for f in ARCHITECTURE_FIELDS if f != "scan_layers") + ("max_seq_len",)


def source_kind(path: str | Path) -> str:
    """ "hf", "meta" or "llama_jax": what the directory at `path` holds."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"init_from {path} does not exist.")
    if (path / "config.json").is_file() and any(path.glob("*.safetensors")):
        return "hf"
    if (path / "params.json").is_file() and any(path.glob("consolidated.*.pth")):
        return "meta"
    workdir_like = (path / "checkpoints").is_dir() or (path.name.isdigit() and (path / "state").is_dir())
    if (path / MODEL_CONFIG_FILE).is_file() or workdir_like:
        return "llama_jax"
    raise ConfigError(
        f"init_from {path} is neither a Hugging Face directory (config.json and .safetensors files), "
        "a Meta directory (params.json and consolidated.NN.pth), a llama_jax parameters checkpoint "
        "nor a training workdir."
    )


def source_config(path: str | Path) -> ModelConfig:
    """The source's architecture, read from its config files alone (no weights are loaded)."""
    path = Path(path)
    kind = source_kind(path)
    if kind == "hf":
        config_file = path / "config.json"
        with config_fields(config_file):
            return config_from_hf(read_json_object(config_file))
    if kind == "meta":
        return _meta_config(path)
    if (path / MODEL_CONFIG_FILE).is_file():
        return model_config_from_dict(json.loads((path / MODEL_CONFIG_FILE).read_text()))
    for record in (path / "experiment.json", path.parent.parent / "experiment.json"):  # workdir, STEP
        if record.is_file():
            return model_config_from_dict(json.loads(record.read_text())["model"])
    return load_for_inference(path)[0]


def _meta_config(path: Path) -> ModelConfig:
    import torch

    params_file = path / "params.json"
    meta = read_json_object(params_file)
    first = sorted(path.glob("consolidated.*.pth"))[0]
    with readable(first, "PyTorch checkpoint"):
        shard = torch.load(first, map_location="cpu", mmap=True, weights_only=True)  # no bytes read
    if "tok_embeddings.weight" not in shard:
        raise ConversionError(f"{first.name} lacks tensor tok_embeddings.weight.")
    vocab_size = meta.get("vocab_size", -1)
    if not isinstance(vocab_size, int) or vocab_size <= 0:  # LLaMA 1: the embedding's rows
        vocab_size = int(shard["tok_embeddings.weight"].shape[0])
    with config_fields(params_file):
        return config_from_meta(meta, vocab_size, tie_embeddings="output.weight" not in shard)


def model_from_source(path: str | Path, model: ModelConfig) -> ModelConfig:
    """`model` with the source's architecture (SOURCE_FIELDS) and its own way of computing."""
    source = source_config(path)
    return model.replace(**{field: getattr(source, field) for field in SOURCE_FIELDS})


def _differences(found: ModelConfig, model: ModelConfig) -> str:
    """The architecture fields where the source differs from the experiment's model, in words."""
    differing = architecture_differences(found, model, tuple(SOURCE_FIELDS[:-1]))
    return ", ".join(f"{k} {theirs} where the experiment has {ours}" for k, theirs, ours in differing)


def check_architecture(path: str | Path, model: ModelConfig) -> None:
    """A source of another architecture than the experiment's model is one sentence."""
    changes = _differences(source_config(path), model)
    if changes:
        raise ConfigError(
            f"init_from {path} is a model of another architecture ({changes}); set model=from_init to "
            "take the source's architecture."
        )


def source_params(path: str | Path, model: ModelConfig, *, progress: bool | None = None) -> dict:
    """The source's parameters as host arrays of model.param_dtype, laid out as `model` says
    (scanned layers or not). The source must have `model`'s architecture (check_architecture)."""
    path = Path(path)
    kind = source_kind(path)
    dtype = model.param_dtype
    if kind == "hf":
        found, params = load_hf(path, param_dtype=dtype, scan_layers=model.scan_layers, progress=progress)
    elif kind == "meta":
        found, params = load_meta(path, param_dtype=dtype, scan_layers=model.scan_layers, progress=progress)
    else:
        found, params = load_model(path)
        if found.scan_layers != model.scan_layers:
            raise CheckpointError(
                f"init_from {path} was saved with scan_layers={found.scan_layers} and the experiment "
                f"has {model.scan_layers}; use the same, or convert it with python -m llama_jax.convert."
            )
    if "score" in params:
        raise CheckpointError(f"init_from {path} is a reward model, not a language model.")
    changes = _differences(found, model)
    if changes:
        raise CheckpointError(f"init_from {path} is a model of another architecture ({changes}).")
    cast = np.dtype(dtype)
    return jax.tree.map(lambda x: np.asarray(x).astype(cast, copy=False), params)


def load_model(path: str | Path) -> tuple[ModelConfig, dict]:
    """(ModelConfig, params) of a whole model from a llama_jax checkpoint or training workdir; a
    LoRA run's adapters come folded into the base it started from (its recorded init_from, of any
    kind, itself possibly a LoRA run), so that a LoRA run is a model like any other."""
    if not is_lora_run(path):
        return load_for_inference(path)
    cfg, adapters, base = load_adapters(path)
    if not base:
        raise CheckpointError(
            f"{path} trained LoRA adapters on a random base (no init_from): there is no model to fold them into."
        )
    if not Path(base).exists():
        raise CheckpointError(f"{path} trained LoRA adapters on {base}, which no longer exists.")
    plain = cfg.replace(lora=None)
    base_params = source_params(base, plain, progress=False)
    return plain, lora_lib.merged_weights(lora_lib.merge(base_params, adapters), cfg.lora)


def source_tokenizer(path: str | Path) -> str | None:
    """The tokenizer that belongs to the source, if it has one: for Hugging Face and Meta
    directories their tokenizer files, for llama_jax checkpoints the one their run recorded."""
    try:
        return tokenizer_of(source_kind(path), path)
    except ConversionError as err:
        raise ConfigError(str(err)) from None


def with_source(exp):
    """The experiment as it starts from its init_from: its architecture resolved (or checked),
    its tokenizer the source's unless data.tokenizer_path names one. Unchanged without one."""
    if not exp.init_from:
        return exp
    if exp.architecture_from_init:
        exp = exp.replace(model=model_from_source(exp.init_from, exp.model), architecture_from_init=False)
    else:
        check_architecture(exp.init_from, exp.model)
    if not exp.data.tokenizer_path:
        tokenizer = source_tokenizer(exp.init_from)
        if tokenizer is not None:
            exp = exp.replace(data=dataclasses.replace(exp.data, tokenizer_path=tokenizer))
    return exp
