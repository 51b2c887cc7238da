"""llama1_33b: the LLaMA 1 pretraining recipe (docs/reference.md, "Recipes"), FSDP over a v5p-512 slice."""

from llama_jax.recipes import llama1


def experiment():
    return llama1("llama1_33b", peak_lr=1.5e-4, total_tokens=1.4e12, target="v5p-512")
