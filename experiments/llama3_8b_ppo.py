"""llama3_8b_ppo: PPO as in Llama 2 (docs/reference.md, "Post-training") on Llama 3 8B (Llama 3 itself dropped PPO for
DPO): reward = whitened reward-model score - 0.01 x KL(policy || reference), clip 0.2, lr 1e-6;
512 prompts per iteration, one step per minibatch of 64; GAE (gamma 1, lambda 0.95); the value
model starts from the reward model. Prompts are `{"prompt": ...}` JSONL.

    python -m llama_jax.train --exp=llama3_8b_ppo init_from=SFT_WORKDIR \\
        posttrain.reward_model=RM_WORKDIR data.sources.0.path=prompts.jsonl
"""

from llama_jax.config import MeshConfig, PosttrainConfig, PPOConfig
from llama_jax.recipes import posttraining


def experiment():
    return posttraining(
        "llama3_8b",
        "ppo",
        data_path="data/prompts.jsonl",
        peak_lr=1e-6,
        steps=200,
        batch_size=512,
        seq_len=2048,
        warmup_steps=5,
        final_lr_ratio=1.0,
        target="v5p-128",
        mesh=MeshConfig(data=1, fsdp=-1, tensor=1),
        init_from="runs/llama3_8b_sft",
        posttrain=PosttrainConfig(
            stage="ppo",
            reward_model="runs/llama3_8b_rm",
            ppo=PPOConfig(max_new_tokens=1024, minibatch_size=64, kl_coef=0.01, clip=0.2),
        ),
        description="Llama 2 PPO: KL 0.01, clip 0.2, lr 1e-6, 512 prompts/iteration.",
    )
