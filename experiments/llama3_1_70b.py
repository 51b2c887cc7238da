"""llama3_1_70b: the Llama 3 pretraining recipe (docs/reference.md, "Recipes") at 8K context, FSDP over a v5p-512 slice."""

from llama_jax.recipes import llama3


def experiment():
    return llama3("llama3_1_70b", peak_lr=1.5e-4, target="v5p-512")
