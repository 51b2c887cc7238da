"""llama3_1_405b: the Llama 3 405B recipe (REFERENCE.md): 16M-token batches, 8000 warmup steps,
peak 8e-5, cosine over 1.2M steps, annealed. FSDP x 4-way tensor parallelism on a v5p-1024 slice."""

from llama_jax.config import MeshConfig
from llama_jax.recipes import llama3


def experiment():
    return llama3("llama3_1_405b", peak_lr=8e-5, target="v5p-1024", large=True,
                  mesh=MeshConfig(data=1, fsdp=-1, tensor=4))
