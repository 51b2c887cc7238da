"""llama3_8b: the Llama 3 pretraining recipe (docs/reference.md, "Recipes") at 8K context, FSDP over a v5p-128 slice."""

from llama_jax.recipes import llama3


def experiment():
    return llama3("llama3_8b", peak_lr=3e-4, target="v5p-128")
