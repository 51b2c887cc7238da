"""llama1_7b: the LLaMA 1 pretraining recipe (docs/reference.md, "Recipes"), FSDP over a v5p-128 slice."""

from llama_jax.recipes import llama1


def experiment():
    return llama1("llama1_7b", peak_lr=3e-4, total_tokens=1.0e12, target="v5p-128")
