"""Weight conversion between llama_jax and the Hugging Face and Meta formats.

- `load_hf(path)` / `save_hf(params, cfg, path)`: Hugging Face directories (`hf.py`).
- `load_meta(path)` / `save_meta(params, cfg, path, shards=N)`: Meta's `params.json` +
  `consolidated.NN.pth` shards, of LLaMA 1, Llama 2 or Llama 3 (`meta.py`).
- `load_peft(path, cfg)` / `save_peft(adapters, cfg, lora, path)`: LoRA adapters in the layout of
  Hugging Face's `peft` library (`peft.py`).
- `read_params(kind, path)` and `python -m llama_jax.convert`: any source to any destination,
  including llama_jax parameters checkpoints, with PEFT adapters merged in (`cli.py`).

Every reader converts tensor by tensor into preallocated arrays (`tree.py`), so peak host memory
is the output plus one tensor.
"""

from llama_jax.convert.cli import read_params, write_params
from llama_jax.convert.common import ConversionError
from llama_jax.convert.hf import config_from_hf, config_to_hf, hf_tensor_mappings, load_hf, save_hf
from llama_jax.convert.meta import config_from_meta, load_meta, save_meta
from llama_jax.convert.peft import load_peft, merge_peft_into, save_peft
from llama_jax.convert.tree import TensorMapping

__all__ = [
    "ConversionError",
    "TensorMapping",
    "config_from_hf",
    "config_from_meta",
    "config_to_hf",
    "hf_tensor_mappings",
    "load_hf",
    "load_meta",
    "load_peft",
    "merge_peft_into",
    "read_params",
    "save_hf",
    "save_meta",
    "save_peft",
    "write_params",
]
