"""Pretraining: the next-token loss on packed text batches of the experiment's data. Every choice
is the `Stage` default; this file only names it."""

from __future__ import annotations

from llama_jax.config import Experiment
from llama_jax.trainer import Stage, register_stage, text_loss


@register_stage("pretrain")
class Pretrain(Stage):
    def loss(self, exp: Experiment):
        return text_loss(exp)
