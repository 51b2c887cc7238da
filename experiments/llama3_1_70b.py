"""llama3_1_70b: the Llama 3.1 recipe (docs/reference.md, "Recipes" and "Training in phases"): Llama 3's
pretraining at 8K with FSDP over a v5p-512 slice, then six stages to 128K and the anneal, each
128K sequence split over 8 devices (context parallelism). `python -m llama_jax.aot --recipes
llama3_1_70b` shows the fit of the 8K and the 128K phases."""

from llama_jax.recipes import llama3_1


def experiment():
    return llama3_1("llama3_1_70b", peak_lr=1.5e-4, target="v5p-512", long_context=8)
