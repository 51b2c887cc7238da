"""llama3_8b_sft: supervised fine-tuning of Llama 3 8B on chat JSONL (`{"messages": [...]}`), loss
on the assistant replies only, conversations packed with document masking. docs/reference.md, "Post-training": lr 1e-5,
8.5K-9K steps; the batch (64 packed rows of 8K tokens) and warmup are our choice.

    python -m llama_jax.train --exp=llama3_8b_sft init_from=CKPT \\
        data.sources.0.path=chats.jsonl data.tokenizer_path=tokenizer.model
"""

from llama_jax.config import MeshConfig, PosttrainConfig
from llama_jax.recipes import posttraining


def experiment():
    return posttraining(
        "llama3_8b",
        "sft",
        data_path="data/sft.jsonl",
        tokenizer_path="",
        peak_lr=1e-5,
        steps=9000,
        batch_size=64,
        seq_len=8192,
        warmup_steps=100,
        target="v5p-128",
        mesh=MeshConfig(data=1, fsdp=-1, tensor=1),
        init_from="checkpoints/llama3_8b",
        posttrain=PosttrainConfig(
            stage="sft",
        ),
        description="Llama 3 SFT: lr 1e-5, 9K steps, assistant tokens only.",
    )
