"""llama2_70b: the Llama 2 pretraining recipe (docs/reference.md, "Recipes"), FSDP over a v5p-512 slice."""

from llama_jax.recipes import llama2


def experiment():
    return llama2("llama2_70b", peak_lr=1.5e-4, target="v5p-512")
