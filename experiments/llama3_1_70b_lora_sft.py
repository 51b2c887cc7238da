"""llama3_1_70b_lora_sft: LoRA supervised fine-tuning of Llama 3.1 70B on a v5p-8 slice (4 chips):
the frozen base in bf16 split over the chips (FSDP), rank-16 adapters on every matrix of attention
and the feed-forward (docs/reference.md, "LoRA and QLoRA"). lr 1e-4 and the batch (16 packed rows of
4K tokens in 4 microbatches) are our choice. `python -m llama_jax.aot --recipes
llama3_1_70b_lora_sft` checks the fit.

    python -m llama_jax.train --exp=llama3_1_70b_lora_sft init_from=Llama-3.1-70B \\
        data.sources.0.path=chats.jsonl
"""

import dataclasses

from llama_jax.config import LoraConfig, MeshConfig, PosttrainConfig
from llama_jax.recipes import posttraining


def experiment():
    exp = posttraining(
        "llama3_1_70b",
        "sft",
        data_path="data/sft.jsonl",
        peak_lr=1e-4,
        steps=2000,
        batch_size=16,
        seq_len=4096,
        microbatches=4,
        warmup_steps=60,
        target="v5p-8",
        mesh=MeshConfig(data=1, fsdp=-1, tensor=1),
        init_from="checkpoints/llama3_1_70b",
        posttrain=PosttrainConfig(stage="sft"),
        name="llama3_1_70b_lora_sft",
        description="LoRA SFT of Llama 3.1 70B on a v5p-8 slice: bf16 base, rank 16 on all seven matrices.",
    )
    targets = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
    # The logits fit beside the base (`python -m llama_jax.aot` chooses: see train.keep_logits).
    train = dataclasses.replace(exp.train, keep_logits=True)
    return exp.replace(train=train, lora=LoraConfig(rank=16, alpha=32.0, dropout=0.05, targets=targets))
