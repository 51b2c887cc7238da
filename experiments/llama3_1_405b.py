"""llama3_1_405b: the Llama 3.1 405B recipe (docs/reference.md, "Recipes" and "Training in phases"): the
batch ramp (4M tokens at 4,096, 8M at 8,192 after 252M tokens, 16M after 2.87T), 8000 warmup steps,
peak 8e-5, cosine over 1.2M steps; then six stages to 128K and the anneal. FSDP x 8-way tensor
parallelism (one KV head per tensor shard, as Meta's TP 8) on a v5p-1024 slice, 32 microbatches
at 8K; at 128K each sequence is split over the 64 devices of an 8x8 plane of the torus (context
parallelism; a mesh axis must be whole torus dimensions), one sequence per microbatch.
`python -m llama_jax.aot --recipes llama3_1_405b` shows the fit of the 8K and the 128K phases."""

from llama_jax.config import MeshConfig
from llama_jax.recipes import llama3_1


def experiment():
    return llama3_1(
        "llama3_1_405b",
        peak_lr=8e-5,
        target="v5p-1024",
        large=True,
        mesh=MeshConfig(data=1, fsdp=-1, tensor=8),
        microbatches=32,
        long_context=64,
        long_microbatches=128,
    )
