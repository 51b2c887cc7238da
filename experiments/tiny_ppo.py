"""tiny_ppo: the ppo stage at toy size on a CPU (the `tiny` model), for tests and
demonstrations; data: prompts `{"prompt": ...}` as JSONL at data.sources.0.path.

    python -m llama_jax.train --exp=tiny_ppo data.sources.0.path=FILE.jsonl data.tokenizer_path=...
"""

import dataclasses

from llama_jax.config import PosttrainConfig, PPOConfig
from llama_jax.recipes import posttraining


def experiment():
    exp = posttraining(
        "tiny", "ppo", data_path="data/tiny_ppo.jsonl", peak_lr=1e-5, steps=50, batch_size=16,
        seq_len=128, warmup_steps=10, target="cpu", remat="none",
        posttrain=PosttrainConfig(stage="ppo", init_from="runs/tiny_sft", reward_model="runs/tiny_rm",
                                  ppo=PPOConfig(max_new_tokens=16, minibatch_size=8)))
    return exp.replace(train=dataclasses.replace(exp.train, eval_every=50, eval_batches=4),
                       checkpoint=dataclasses.replace(exp.checkpoint, every_steps=0))
