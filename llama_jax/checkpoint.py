"""Checkpoints on Orbax.

`save_params` / `load_params`: a parameters-only checkpoint (for inference and conversion), an
Orbax PyTree under DIR/params with the ModelConfig in DIR/model_config.json.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from llama_jax.config import ModelConfig, model_config_from_dict

MODEL_CONFIG_FILE = "model_config.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message says which and why."""


def save_params(path: str | Path, params, cfg: ModelConfig) -> Path:
    """Writes `params` and `cfg` to the directory `path` (created; must not hold params already)."""
    path = Path(path).absolute()
    path.mkdir(parents=True, exist_ok=True)
    if (path / "params").exists():
        raise CheckpointError(f"{path} already holds a parameters checkpoint; choose a new directory.")
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(path / "params", params)
        checkpointer.wait_until_finished()
    (path / MODEL_CONFIG_FILE).write_text(json.dumps(dataclasses.asdict(cfg), indent=1))
    return path


def load_params(path: str | Path, shardings=None) -> tuple[ModelConfig, dict]:
    """(ModelConfig, params) from `save_params`; placed with `shardings` if given."""
    path = Path(path).absolute()
    if not (path / MODEL_CONFIG_FILE).is_file() or not (path / "params").is_dir():
        raise CheckpointError(f"{path} is not a llama_jax parameters checkpoint (no {MODEL_CONFIG_FILE} "
                              "or params/).")
    cfg = model_config_from_dict(json.loads((path / MODEL_CONFIG_FILE).read_text()))
    with ocp.StandardCheckpointer() as checkpointer:
        if shardings is None:
            params = checkpointer.restore(path / "params")
        else:
            metadata = checkpointer.metadata(path / "params")
            tree = getattr(metadata, "item_metadata", metadata)
            target = jax.tree.map(lambda m, s: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=s),
                                  tree, shardings)
            params = checkpointer.restore(path / "params", target)
    return cfg, params
