"""llama_jax: the Llama model family in JAX and Flax."""

__version__ = "0.1.0"
