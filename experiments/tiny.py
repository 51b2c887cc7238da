"""tiny: the default experiment. A 4-layer Llama 3-shaped toy trained on the Python standard
library's own source files, with a tokenizer trained on them once and cached; a few minutes on a
laptop CPU."""

from llama_jax.config import Experiment


def experiment():
    return Experiment()
