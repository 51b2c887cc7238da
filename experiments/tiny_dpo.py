"""tiny_dpo: the dpo stage at toy size on a CPU (the `tiny` model), for tests and
demonstrations; data: preference pairs `{"prompt", "chosen", "rejected"}` as JSONL at data.sources.0.path.

    python -m llama_jax.train --exp=tiny_dpo data.sources.0.path=FILE.jsonl data.tokenizer_path=...
"""

from llama_jax.config import PosttrainConfig
from llama_jax.recipes import tiny_posttraining


def experiment():
    return tiny_posttraining(
        "dpo",
        peak_lr=1e-4,
        steps=100,
        init_from="runs/tiny_sft",
        posttrain=PosttrainConfig(
            stage="dpo",
        ),
    )
