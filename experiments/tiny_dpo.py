"""tiny_dpo: the dpo stage at toy size on a CPU (the `tiny` model), for tests and
demonstrations; data: preference pairs `{"prompt", "chosen", "rejected"}` as JSONL at data.sources.0.path.

    python -m llama_jax.train --exp=tiny_dpo data.sources.0.path=FILE.jsonl data.tokenizer_path=...
"""

import dataclasses

from llama_jax.config import PosttrainConfig
from llama_jax.recipes import posttraining


def experiment():
    exp = posttraining(
        "tiny", "dpo", data_path="data/tiny_dpo.jsonl", peak_lr=1e-4, steps=100, batch_size=16,
        seq_len=128, warmup_steps=10, target="cpu", remat="none",
        posttrain=PosttrainConfig(stage="dpo", init_from="runs/tiny_sft"))
    return exp.replace(train=dataclasses.replace(exp.train, eval_every=50, eval_batches=4),
                       checkpoint=dataclasses.replace(exp.checkpoint, every_steps=0))
