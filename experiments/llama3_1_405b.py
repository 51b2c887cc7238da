"""llama3_1_405b: the Llama 3 405B recipe (docs/reference.md, "Recipes"): 16M-token batches, 8000 warmup steps,
peak 8e-5, cosine over 1.2M steps, annealed. FSDP x 8-way tensor parallelism (one KV head per
tensor shard, as Meta's TP 8) on a v5p-1024 slice, 32 microbatches of one sequence per FSDP shard
(`python -m llama_jax.aot --recipes llama3_1_405b` shows the fit)."""

from llama_jax.config import MeshConfig
from llama_jax.recipes import llama3


def experiment():
    return llama3(
        "llama3_1_405b",
        peak_lr=8e-5,
        target="v5p-1024",
        large=True,
        mesh=MeshConfig(data=1, fsdp=-1, tensor=8),
        microbatches=32,
    )
