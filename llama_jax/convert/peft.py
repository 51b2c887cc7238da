"""LoRA adapters in and out of the layout of Hugging Face's `peft` library.

A PEFT adapter directory holds `adapter_config.json` and `adapter_model.safetensors`, which
`peft.PeftModel.from_pretrained` puts onto the Hugging Face form of the base model (`hf.py`).
Our adapted weight W computes x W + scale (x A) B with A [in..., rank] and B [rank, out...]
(`lora.py`); PEFT keeps the same product on the torch Linear that holds W, as lora_A.weight
[rank, in] and lora_B.weight [out, rank], with the same scale lora_alpha / r (not rsLoRA's):

    base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight = A.reshape(in, rank).T
    base_model.model.model.layers.{i}.self_attn.q_proj.lora_B.weight = B.reshape(rank, out).T
    base_model.model.lm_head.lora_A.weight, ...

    save_peft(adapters, cfg, lora, path, base="meta-llama/Llama-3.2-1B")
    lora, adapters = load_peft(path, cfg)     # adapters: our tree, numpy float32
    params = merge_peft_into(params, cfg, path)  # the adapters folded into the base's weights

Only plain LoRA reads: a configuration that changes what the adapters compute (rsLoRA, DoRA,
per-module ranks, some layers only, biases, fully trained modules, initialisations that rewrite
the base) is refused in one sentence rather than converted into something else.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from llama_jax.config import LORA_TARGETS, LoraConfig, ModelConfig
from llama_jax.convert import tree
from llama_jax.convert.common import (
    ConversionError,
    atomic_directory,
    config_fields,
    read_json_object,
    readable,
    require_empty_destination,
)
from llama_jax.convert.tree import TensorMapping
from llama_jax.lora import ADAPTER_SUFFIXES, adapter_names, merge, merged_weights

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."  # PeftModel's wrapper and LoraModel's attribute in front of the model

# Our weight -> (its group in a layer's tree, or None at the top; the torch module that holds it).
MODULES = {
    "wq": ("attention", "self_attn.q_proj"),
    "wk": ("attention", "self_attn.k_proj"),
    "wv": ("attention", "self_attn.v_proj"),
    "wo": ("attention", "self_attn.o_proj"),
    "w1": ("feed_forward", "mlp.gate_proj"),
    "w3": ("feed_forward", "mlp.up_proj"),
    "w2": ("feed_forward", "mlp.down_proj"),
    "output": (None, "lm_head"),
}
HF_NAMES = {weight: module.rsplit(".", 1)[-1] for weight, (_, module) in MODULES.items()}
# PEFT's "all-linear" shorthand: every Linear but the output layer.
ALL_LINEAR = ("wq", "wk", "wv", "wo", "w1", "w3", "w2")
# PEFT's own choice for a Llama config that names no target_modules.
PEFT_LLAMA_DEFAULT = ("wq", "wv")
# Modules of LlamaForCausalLM besides the adaptable Linears, that a pattern might name.
_OTHER_TOP_MODULES = ("model", "model.embed_tokens", "model.layers", "model.norm", "model.rotary_emb")
_OTHER_LAYER_MODULES = (
    "",
    ".self_attn",
    ".mlp",
    ".mlp.act_fn",
    ".input_layernorm",
    ".post_attention_layernorm",
)
# Copies of the embedding layers that PEFT saves beside adapters of lm_head or embed_tokens
# (save_embedding_layers): the frozen base's own weights, so they are checked for shape and skipped.
_EMBEDDING_COPIES = {
    f"{PREFIX}lm_head.base_layer.weight": "output",
    f"{PREFIX}lm_head.weight": "output",
    f"{PREFIX}model.embed_tokens.base_layer.weight": "tok_embeddings",
    f"{PREFIX}model.embed_tokens.weight": "tok_embeddings",
}

# Fields of adapter_config.json that change what the adapters compute, with what they are.
_UNSUPPORTED = (
    ("use_rslora", "rank-stabilised LoRA, scaled by lora_alpha / sqrt(r)"),
    ("use_dora", "DoRA's weight decomposition"),
    ("rank_pattern", "a rank per module"),
    ("alpha_pattern", "an alpha per module"),
    ("layers_to_transform", "adapters on some layers only"),
    ("layer_replication", "replicated layers"),
    ("modules_to_save", "modules trained in full beside the adapters"),
    ("trainable_token_indices", "trained embedding rows"),
    ("exclude_modules", "modules excluded from the targets"),
    ("target_parameters", "adapters on bare parameters"),
    ("lora_bias", "biases on lora_B"),
    ("use_qalora", "QA-LoRA's pooled inputs"),
    ("use_bdlora", "block-diagonal LoRA"),
    ("alora_invocation_tokens", "activated LoRA, switched on by invocation tokens"),
    ("velora_config", "the VeLoRA variant"),
    ("kasa_config", "the KaSA variant"),
    ("monteclora_config", "the MonteCLoRA variant"),
    ("arrow_config", "Arrow routing between adapters"),
)
# Initialisations that set only A and B (which the saved weights replace); the others (PiSSA,
# OLoRA, CorDA, LoftQ, LoRA-GA, ...) rewrite the base weights too, so the adapters do not apply
# to the original base.
_BASE_PRESERVING_INITS = (True, False, "gaussian", "eva", "orthogonal")


def _in_out(cfg: ModelConfig, weight: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The input and output axes of one of our weights (per layer)."""
    d, f, v = cfg.dim, cfg.ffn_dim, cfg.vocab_size
    h, k, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    return {
        "wq": ((d,), (h, hd)),
        "wk": ((d,), (k, hd)),
        "wv": ((d,), (k, hd)),
        "wo": ((h, hd), (d,)),
        "w1": ((d,), (f,)),
        "w3": ((d,), (f,)),
        "w2": ((f,), (d,)),
        "output": ((d,), (v,)),
    }[weight]


def peft_tensor_mappings(cfg: ModelConfig, targets, rank: int) -> list[TensorMapping]:
    """Every tensor of a PEFT adapter file with the path and shape of our adapter leaf for it
    (`tree.py` then handles stacked or separate layers as `cfg.scan_layers` says)."""
    out = []
    for weight in targets:
        group, module = MODULES[weight]
        ins, outs = _in_out(cfg, weight)
        n_in, n_out = math.prod(ins), math.prod(outs)
        a_name, b_name = adapter_names(weight)
        sides = (
            ("lora_A", a_name, (rank, n_in), (*ins, rank)),
            ("lora_B", b_name, (n_out, rank), (rank, *outs)),
        )
        layers = [None] if group is None else range(cfg.n_layers)
        for layer in layers:
            where = module if layer is None else f"model.layers.{layer}.{module}"
            for side, leaf, hf_shape, shape in sides:
                path = (leaf,) if group is None else (group, leaf)
                out.append(
                    TensorMapping(f"{PREFIX}{where}.{side}.weight", path, hf_shape, shape, layer=layer)
                )
    return out


def _hf_modules(cfg: ModelConfig) -> dict[str, str | None]:
    """The module names of a Hugging Face LlamaForCausalLM -> our weight, None for those LoRA
    cannot adapt here."""
    names: dict[str, str | None] = {name: None for name in _OTHER_TOP_MODULES}
    names["lm_head"] = "output"
    for i in range(cfg.n_layers):
        layer = f"model.layers.{i}"
        names.update({layer + suffix: None for suffix in _OTHER_LAYER_MODULES})
        names.update({f"{layer}.{module}": weight for weight, (group, module) in MODULES.items() if group})
    return names


def _is_set(value) -> bool:
    """An optional adapter_config.json field that asks for something: not null, false, {} or []."""
    return value is not None and value is not False and value != {} and value != []


def _resolve_targets(target_modules, cfg: ModelConfig, file: Path) -> tuple[str, ...]:
    """Our weights named by PEFT's target_modules: a list of module names (each matching a module
    or the end of its dotted name), a regular expression matched against whole module names, or
    "all-linear"."""
    if target_modules is None:
        return PEFT_LLAMA_DEFAULT
    modules = _hf_modules(cfg)
    if isinstance(target_modules, str):
        if target_modules.lower() == "all-linear":
            return ALL_LINEAR
        try:
            pattern = re.compile(target_modules)
        except re.error as err:
            raise ConversionError(
                f"{file} has target_modules {target_modules!r}, which is not a regular expression ({err})."
            ) from None
        matched = [name for name in modules if pattern.fullmatch(name)]
        if not matched:
            raise ConversionError(
                f"{file} has target_modules {target_modules!r}, which matches no module of a Llama model."
            )
    elif isinstance(target_modules, list) and all(isinstance(t, str) for t in target_modules):
        matched = []
        for entry in target_modules:
            hits = [name for name in modules if name == entry or name.endswith(f".{entry}")]
            if not hits:
                raise ConversionError(
                    f"{file} names the target module {entry!r}, which a Llama model does not have "
                    f"(LoRA adapts {', '.join(HF_NAMES.values())})."
                )
            matched += [name for name in hits if name not in matched]
    else:
        raise ConversionError(
            f"{file} has target_modules {target_modules!r}; expected a list of module names or a pattern."
        )
    unsupported = [name for name in matched if modules[name] is None]
    if unsupported:
        raise ConversionError(
            f"{file} adapts {unsupported[0]} (target_modules {target_modules!r}), which llama_jax "
            f"cannot adapt; it adapts {', '.join(HF_NAMES.values())}."
        )
    targets = list(dict.fromkeys(modules[name] for name in matched))
    for weight in targets:
        group, module = MODULES[weight]
        if group is not None:
            layers = [i for i in range(cfg.n_layers) if f"model.layers.{i}.{module}" in matched]
            if len(layers) != cfg.n_layers:
                raise ConversionError(
                    f"{file} adapts {HF_NAMES[weight]} in layers {layers} only (target_modules "
                    f"{target_modules!r}); llama_jax adapts a weight in every layer or none."
                )
    return tuple(targets)


def read_peft_config(path: str | os.PathLike) -> dict:
    """adapter_config.json of a PEFT directory, checked for what needs no model config: both files
    there, a LoRA adapter, and nothing that changes what the adapters compute."""
    path = Path(path)
    if not path.is_dir():
        raise ConversionError(f"The adapter directory {path} does not exist.")
    file = path / CONFIG_FILE
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (path / name).is_file():
            raise ConversionError(f"{path} is not a PEFT adapter directory: no {name}.")
    config = read_json_object(file)
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise ConversionError(
            f"{file} holds a {peft_type or 'untyped'} adapter (peft_type); only LoRA adapters are supported."
        )
    task_type = config.get("task_type")
    if task_type not in (None, "CAUSAL_LM"):
        raise ConversionError(
            f"{file} is for task_type {task_type!r}; only adapters of a causal language model "
            "(CAUSAL_LM, LlamaForCausalLM) are supported."
        )
    for field, what in _UNSUPPORTED:
        if _is_set(config.get(field)):
            raise ConversionError(
                f"{file} sets {field} ({what}: {config[field]!r}), which llama_jax does not support."
            )
    if config.get("bias", "none") != "none":
        raise ConversionError(
            f"{file} sets bias {config['bias']!r} (trained biases), which llama_jax does not support."
        )
    init = config.get("init_lora_weights", True)
    if not any(init is ok or (isinstance(ok, str) and init == ok) for ok in _BASE_PRESERVING_INITS):
        raise ConversionError(
            f"{file} sets init_lora_weights {init!r}, an initialisation that may rewrite the base "
            "weights too (as PiSSA, OLoRA, CorDA and LoftQ do), which llama_jax does not support."
        )
    return config


def lora_config_from_peft(config: dict, cfg: ModelConfig, file: Path) -> LoraConfig:
    """Our LoraConfig from adapter_config.json's fields (PEFT's defaults where absent)."""
    targets = _resolve_targets(config.get("target_modules"), cfg, file)
    with config_fields(file):
        rank, alpha = config.get("r", 8), config.get("lora_alpha", 8)
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ConversionError(f"{file} has r {rank!r}; the rank is a whole number of at least 1.")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
            raise ConversionError(f"{file} has lora_alpha {alpha!r}; expected a number.")
        lora = LoraConfig(
            rank=rank, alpha=float(alpha), dropout=float(config.get("lora_dropout") or 0.0), targets=targets
        )
    _check_tied_head(lora, cfg, str(file))
    return lora


def _check_tied_head(lora: LoraConfig, cfg: ModelConfig, where: str) -> None:
    if "output" in lora.targets and cfg.tie_embeddings:
        raise ConversionError(
            f"{where} adapts the output head (lm_head), but this model ties it to the embeddings; "
            "llama_jax adapts only a separate output head."
        )


def _same_base(given: str, recorded: str) -> bool:
    if given.rstrip("/") == recorded.rstrip("/"):
        return True
    return (
        Path(given).exists() and Path(recorded).exists() and Path(given).resolve() == Path(recorded).resolve()
    )


def load_peft(
    path: str | os.PathLike,
    cfg: ModelConfig,
    *,
    scan_layers: bool | None = None,
    base: str | None = None,
) -> tuple[LoraConfig, dict]:
    """(LoraConfig, adapters) from a PEFT LoRA directory for the base model `cfg`: the adapter
    tree in our layout (layers stacked if `scan_layers`, default `cfg.scan_layers`) as numpy
    float32. With `base`, the adapters must have been saved for it (base_model_name_or_path)."""
    path = Path(path)
    config = read_peft_config(path)
    file = path / CONFIG_FILE
    recorded = config.get("base_model_name_or_path") or ""
    if base and recorded and not _same_base(str(base), str(recorded)):
        raise ConversionError(f"The adapters in {path} were saved for another base: {recorded}, not {base}.")
    lora = lora_config_from_peft(config, cfg, file)
    if scan_layers is not None:
        cfg = cfg.replace(scan_layers=scan_layers)
    mappings = peft_tensor_mappings(cfg, lora.targets, lora.rank)
    weights = path / WEIGHTS_FILE
    with readable(weights, "safetensors"), safe_open(weights, framework="np") as handle:
        names = set(handle.keys())
        expected = {m.hf_name for m in mappings}
        missing = sorted(expected - names)
        if missing:
            more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
            raise ConversionError(
                f"{weights} lacks tensor {missing[0]}{more}, which its {CONFIG_FILE} implies."
            )
        unexpected = sorted(names - expected - _EMBEDDING_COPIES.keys())
        if unexpected:
            raise ConversionError(
                f"{weights} has tensor {unexpected[0]}, which a LoRA adapter of "
                f"{', '.join(HF_NAMES[t] for t in lora.targets)} does not have."
            )
        for name in sorted(names & _EMBEDDING_COPIES.keys()):
            shape = tuple(handle.get_slice(name).get_shape())
            if shape != (cfg.vocab_size, cfg.dim):
                raise ConversionError(
                    f"Tensor {name} in {weights.name} has shape {shape}, but the base model's "
                    f"{_EMBEDDING_COPIES[name]} is {(cfg.vocab_size, cfg.dim)}: were the adapters "
                    "saved for another base (or a resized vocabulary)?"
                )
        adapters = tree.allocate(cfg, mappings, np.float32)
        for m in mappings:
            tensor = handle.get_tensor(m.hf_name)
            shape = tuple(tensor.shape)
            if shape != m.hf_shape:
                rank_axis = 0 if m.hf_name.endswith("lora_A.weight") else 1
                if len(shape) == 2 and shape[1 - rank_axis] == m.hf_shape[1 - rank_axis]:
                    why = f"its {CONFIG_FILE} says r={lora.rank}"
                else:
                    why = "the base model implies that: were the adapters saved for another base?"
                raise ConversionError(
                    f"Tensor {m.hf_name} in {weights.name} has shape {shape}, not {m.hf_shape}; {why}"
                    + ("" if why.endswith("?") else ".")
                )
            m.copy_into(tree.slot(adapters, cfg, m), tensor)
    return lora, adapters


def _as_dicts(node):
    if hasattr(node, "items") and not hasattr(node, "shape"):
        return {key: _as_dicts(value) for key, value in node.items()}
    return node


def _adapted_weights(node) -> set[str]:
    """The weights that have an adapter leaf anywhere in a tree."""
    found = set()
    for key, value in node.items():
        if isinstance(value, dict):
            found |= _adapted_weights(value)
        elif key.endswith(ADAPTER_SUFFIXES):
            found.add(key.rsplit("_lora_", 1)[0])
    return found


def _stacked(adapters: dict, cfg: ModelConfig) -> bool:
    """Whether a tree keeps its layers stacked (`layers`) or apart (`layers_0`, ...)."""
    if "layers" in adapters:
        return True
    if any(re.fullmatch(r"layers_\d+", key) for key in adapters):
        return False
    return cfg.scan_layers


def adapter_config(lora: LoraConfig, base: str = "") -> dict:
    """adapter_config.json for `lora`, in the fields PEFT's LoraConfig reads."""
    alpha = int(lora.alpha) if float(lora.alpha).is_integer() else lora.alpha
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base or None,
        "revision": None,
        "inference_mode": True,
        "r": lora.rank,
        "lora_alpha": alpha,
        "lora_dropout": lora.dropout,
        "target_modules": [HF_NAMES[t] for t in lora.targets],
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }


def save_peft(
    adapters, cfg: ModelConfig, lora: LoraConfig, path: str | os.PathLike, *, base: str = ""
) -> Path:
    """Writes `adapters` (our tree, numpy or JAX arrays, layers stacked or apart; leaves other than
    adapters are ignored) as a PEFT LoRA directory that `peft.PeftModel.from_pretrained` loads onto
    the Hugging Face form of the base `base`: float32, or bfloat16 if the adapters are. `path` must
    be absent or empty; a failure leaves nothing there."""
    final = Path(path)
    require_empty_destination(final)
    if not lora.rank:
        raise ConversionError("lora.rank is 0: there are no adapters to save.")
    _check_tied_head(lora, cfg, "lora.targets")
    adapters = _as_dicts(adapters)
    found = _adapted_weights(adapters)
    if found != set(lora.targets):
        raise ConversionError(
            f"The adapters are of {sorted(found) or 'no weight'}, but lora.targets names "
            f"{sorted(lora.targets)}."
        )
    cfg = cfg.replace(scan_layers=_stacked(adapters, cfg))
    mappings = peft_tensor_mappings(cfg, [t for t in LORA_TARGETS if t in lora.targets], lora.rank)
    tree.check_shapes(adapters, cfg, mappings)
    leaves = [tree.fetch(adapters, cfg, m) for m in mappings]
    bf16 = tree.numpy_dtype("bfloat16")
    dtype = bf16 if all(leaf.dtype == bf16 for leaf in leaves) else np.dtype(np.float32)
    tensors = {
        m.hf_name: np.ascontiguousarray(m.to_hf(leaf), dtype=dtype) for m, leaf in zip(mappings, leaves)
    }
    with atomic_directory(final) as partial:
        save_file(tensors, partial / WEIGHTS_FILE, metadata={"format": "pt"})
        (partial / CONFIG_FILE).write_text(json.dumps(adapter_config(lora, base), indent=2) + "\n")
    return final


def merge_peft_into(params: dict, cfg: ModelConfig, path: str | os.PathLike) -> dict:
    """`params` (host arrays of the base `cfg`) with the PEFT LoRA adapters in `path` folded into
    their weights, W + lora_alpha / r A B, each in W's dtype: a plain model's parameters."""
    params = _as_dicts(params)
    if _adapted_weights(params):
        raise ConversionError(
            "The source parameters already carry LoRA adapters; merge those first (lora.merged_weights)."
        )
    lora, adapters = load_peft(path, cfg, scan_layers=_stacked(params, cfg))
    return merged_weights(merge(params, adapters), lora)
