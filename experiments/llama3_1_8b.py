"""llama3_1_8b: the Llama 3.1 recipe (docs/reference.md, "Recipes" and "Training in phases"): Llama 3's
pretraining at 8K with FSDP over a v5p-128 slice, then six stages to 128K and the anneal, each
128K sequence split over 4 devices (context parallelism), 2 microbatches. `python -m
llama_jax.aot --recipes llama3_1_8b` shows the fit of the 8K and the 128K phases."""

from llama_jax.recipes import llama3_1


def experiment():
    return llama3_1("llama3_1_8b", peak_lr=3e-4, target="v5p-128", long_context=4, long_microbatches=2)
