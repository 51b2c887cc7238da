"""tiny_rm: the rm stage at toy size on a CPU (the `tiny` model), for tests and
demonstrations; data: preference pairs `{"prompt", "chosen", "rejected"[, "margin"]}` as JSONL at data.sources.0.path.

    python -m llama_jax.train --exp=tiny_rm data.sources.0.path=FILE.jsonl data.tokenizer_path=...
"""

import dataclasses

from llama_jax.config import PosttrainConfig
from llama_jax.recipes import posttraining


def experiment():
    exp = posttraining(
        "tiny", "rm", data_path="data/tiny_rm.jsonl", peak_lr=1e-4, steps=200, batch_size=16,
        seq_len=128, warmup_steps=10, target="cpu", remat="none",
        posttrain=PosttrainConfig(stage="rm", init_from="runs/tiny_sft"))
    return exp.replace(train=dataclasses.replace(exp.train, eval_every=50, eval_batches=4),
                       checkpoint=dataclasses.replace(exp.checkpoint, every_steps=0))
