"""llama3_1_8b_qlora_sft: QLoRA supervised fine-tuning of Llama 3.1 8B on one 16 GiB chip (v5e-1):
the base frozen in 4-bit NF4, rank-16 adapters on every matrix of attention and the feed-forward
(docs/reference.md, "LoRA and QLoRA"). lr 2e-4 and alpha 16 as the QLoRA paper tunes them; the batch (16
packed rows of 4K tokens in 8 microbatches) is our choice. `python -m llama_jax.aot --recipes
llama3_1_8b_qlora_sft` checks the fit.

    python -m llama_jax.train --exp=llama3_1_8b_qlora_sft init_from=Llama-3.1-8B \\
        data.sources.0.path=chats.jsonl
"""

from llama_jax.config import LoraConfig, MeshConfig, PosttrainConfig
from llama_jax.recipes import posttraining


def experiment():
    exp = posttraining(
        "llama3_1_8b",
        "sft",
        data_path="data/sft.jsonl",
        peak_lr=2e-4,
        steps=2000,
        batch_size=16,
        seq_len=4096,
        microbatches=8,
        warmup_steps=60,
        target="v5e-1",
        mesh=MeshConfig(data=1, fsdp=-1, tensor=1),
        init_from="checkpoints/llama3_1_8b",
        posttrain=PosttrainConfig(stage="sft"),
        name="llama3_1_8b_qlora_sft",
        description="QLoRA SFT of Llama 3.1 8B on one v5e chip: NF4 base, rank 16 on all seven matrices.",
    )
    targets = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
    return exp.replace(
        lora=LoraConfig(rank=16, alpha=16.0, dropout=0.05, targets=targets, quantize_base="nf4")
    )
