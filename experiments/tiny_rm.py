"""tiny_rm: the rm stage at toy size on a CPU (the `tiny` model), for tests and
demonstrations; data: preference pairs `{"prompt", "chosen", "rejected"[, "margin"]}` as JSONL at data.sources.0.path.

    python -m llama_jax.train --exp=tiny_rm data.sources.0.path=FILE.jsonl data.tokenizer_path=...
"""

from llama_jax.config import PosttrainConfig
from llama_jax.recipes import tiny_posttraining


def experiment():
    return tiny_posttraining(
        "rm",
        peak_lr=1e-4,
        steps=200,
        init_from="runs/tiny_sft",
        posttrain=PosttrainConfig(
            stage="rm",
        ),
    )
