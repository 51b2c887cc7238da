"""tiny_ppo: the ppo stage at toy size on a CPU (the `tiny` model), for tests and
demonstrations; data: prompts `{"prompt": ...}` as JSONL at data.sources.0.path.

    python -m llama_jax.train --exp=tiny_ppo data.sources.0.path=FILE.jsonl data.tokenizer_path=...
"""

from llama_jax.config import PosttrainConfig, PPOConfig
from llama_jax.recipes import tiny_posttraining


def experiment():
    return tiny_posttraining(
        "ppo",
        peak_lr=1e-5,
        steps=50,
        init_from="runs/tiny_sft",
        posttrain=PosttrainConfig(
            stage="ppo",
            reward_model="runs/tiny_rm",
            ppo=PPOConfig(max_new_tokens=16, minibatch_size=8),
        ),
    )
