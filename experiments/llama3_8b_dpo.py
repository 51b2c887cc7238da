"""llama3_8b_dpo: DPO as in Llama 3 (docs/reference.md, "Post-training"): beta 0.1, lr 1e-5, formatting and special
tokens masked from both responses, plus 0.2 x the chosen response's NLL; the frozen reference is
the SFT model, its log-probs computed once up front (posttrain.reference_logprobs=online: every
step). Reports implicit-reward margins and accuracies. Batch and steps are our choice.

    python -m llama_jax.train --exp=llama3_8b_dpo init_from=SFT_WORKDIR \\
        data.sources.0.path=pairs.jsonl
"""

from llama_jax.config import MeshConfig, PosttrainConfig
from llama_jax.recipes import posttraining


def experiment():
    return posttraining(
        "llama3_8b",
        "dpo",
        data_path="data/pairs.jsonl",
        peak_lr=1e-5,
        steps=2000,
        batch_size=64,
        seq_len=4096,
        warmup_steps=50,
        target="v5p-128",
        mesh=MeshConfig(data=1, fsdp=-1, tensor=1),
        init_from="runs/llama3_8b_sft",
        posttrain=PosttrainConfig(
            stage="dpo",
            beta=0.1,
            nll_coef=0.2,
            mask_special_tokens=True,
            reference_logprobs="precompute",
        ),
        description="Llama 3 DPO: beta 0.1, lr 1e-5, special tokens masked, 0.2 x chosen NLL.",
    )
