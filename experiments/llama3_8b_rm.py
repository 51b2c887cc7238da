"""llama3_8b_rm: a reward model on Llama 3 8B (the backbone with a scalar head) trained with the
Bradley-Terry loss on `{"prompt", "chosen", "rejected"}` JSONL; Llama 3 uses no margin
(posttrain.use_margin=true gives Llama 2's). Pairwise accuracy is reported on a held-out 5%.
Llama 2's RM settings: lr 1e-5, cosine to 10%, 512 pairs per step, one epoch (set train.steps to
one epoch of your data).

    python -m llama_jax.train --exp=llama3_8b_rm init_from=SFT_WORKDIR \\
        data.sources.0.path=pairs.jsonl train.steps=N
"""

from llama_jax.config import MeshConfig, PosttrainConfig
from llama_jax.recipes import posttraining


def experiment():
    return posttraining(
        "llama3_8b",
        "rm",
        data_path="data/pairs.jsonl",
        peak_lr=1e-5,
        steps=1000,
        batch_size=512,
        seq_len=4096,
        warmup_steps=30,
        target="v5p-128",
        mesh=MeshConfig(data=1, fsdp=-1, tensor=1),
        init_from="runs/llama3_8b_sft",
        posttrain=PosttrainConfig(stage="rm", use_margin=False, eval_fraction=0.05),
        description="Reward model: Bradley-Terry, no margin (Llama 3), held-out pairwise accuracy.",
    )
