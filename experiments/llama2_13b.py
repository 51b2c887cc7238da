"""llama2_13b: the Llama 2 pretraining recipe (docs/reference.md, "Recipes"), FSDP over a v5p-128 slice."""

from llama_jax.recipes import llama2


def experiment():
    return llama2("llama2_13b", peak_lr=3e-4, target="v5p-128")
