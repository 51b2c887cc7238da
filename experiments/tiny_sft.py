"""tiny_sft: the sft stage at toy size on a CPU (the `tiny` model), for tests and
demonstrations; data: chats `{"messages": [...]}` as JSONL at data.sources.0.path.

    python -m llama_jax.train --exp=tiny_sft data.sources.0.path=FILE.jsonl data.tokenizer_path=...
"""

from llama_jax.config import PosttrainConfig
from llama_jax.recipes import tiny_posttraining


def experiment():
    return tiny_posttraining("sft", peak_lr=1e-3, steps=200, posttrain=PosttrainConfig(stage="sft"))
