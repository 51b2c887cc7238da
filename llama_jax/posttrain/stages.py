"""The post-training stages that take one optimizer step per batch: SFT, the reward model and DPO
(PPO, whose step is a rollout-and-update iteration, is in ppo.py). Each is a `trainer.Stage`.

SFT is the pretraining loss on chat data (the assistant mask as the loss mask). The reward model
and DPO train on batches of preference pairs (`posttrain/steps.py`), count pairs rather than
tokens, and evaluate on the whole held-out split.
"""

from __future__ import annotations

import dataclasses
import functools

from llama_jax import lora_training
from llama_jax.chat_template import encode_chat
from llama_jax.config import Experiment
from llama_jax.data.training import TrainingData
from llama_jax.posttrain import inputs as inputs_lib
from llama_jax.posttrain.steps import dpo_batch_loss, pair_batch_shapes, reward_model_loss
from llama_jax.scalar_model import ScalarModel
from llama_jax.trainer import Stage, StageInputs, register_stage, text_loss


class ChatStage(Stage):
    """A stage on a chat model: the end-of-run sample's prompt is a user turn."""

    def sample_prompt(self, exp: Experiment, data: TrainingData) -> list[int] | None:
        message = {"role": "user", "content": data.sample_prompt}
        return encode_chat(
            data.tokenizer, [message], template=data.chat_template, add_generation_prompt=True
        ).ids


@register_stage("sft")
class SFT(ChatStage):
    def loss(self, exp: Experiment):
        return text_loss(exp)

    def prepare(self, exp, mesh, param_shardings, quiet):
        exp, _, template = inputs_lib.tokenizer_and_template(exp, quiet)
        initial = inputs_lib.initial_params(exp)
        exp, data = inputs_lib.chat_data(exp, template, quiet)
        return exp, StageInputs(data, initial_params=initial)


class PairStage(ChatStage):
    """Trains on preference pairs: both sides of each pair go through the model in one batch."""

    count_name = "pairs"

    def batch_shapes(self, exp: Experiment, batch_size: int):
        return pair_batch_shapes(exp, batch_size)

    def tokens_per_step(self, exp: Experiment) -> int:
        return 2 * exp.train.batch_size * exp.train.seq_len

    def eval_batches(self, exp: Experiment) -> int | None:
        return None  # the whole held-out split: its iterator ends

    def pair_inputs(self, exp, mesh, param_shardings, quiet, reward_model: bool):
        """(exp, tokenizer, template, train pairs, held-out pairs, initial parameters)."""
        exp, tokenizer, template = inputs_lib.tokenizer_and_template(exp, quiet)
        initial = inputs_lib.initial_params(exp, reward_model=reward_model)
        train_pairs, eval_pairs = inputs_lib.load_pairs(exp, tokenizer, template)
        return exp, tokenizer, template, train_pairs, eval_pairs, initial


@register_stage("rm")
class RewardModel(PairStage):
    """Bradley-Terry on the scores of a Llama with a scalar head (started from init_from)."""

    def module(self, exp: Experiment):
        return ScalarModel(exp.model)

    def loss(self, exp: Experiment):
        return functools.partial(reward_model_loss, exp=exp)

    def prepare(self, exp, mesh, param_shardings, quiet):
        exp, tokenizer, template, train, held_out, initial = self.pair_inputs(
            exp, mesh, param_shardings, quiet, reward_model=True
        )
        return exp, StageInputs(inputs_lib.pair_data(exp, train, held_out, tokenizer, template), initial)

    def sample_prompt(self, exp, data):
        return None  # a reward model scores; it does not write


@register_stage("dpo")
class DPO(PairStage):
    """DPO against a frozen reference: its log-probs precomputed once, or computed every step."""

    def loss(self, exp: Experiment):
        return functools.partial(dpo_batch_loss, exp=exp)

    def prepare(self, exp, mesh, param_shardings, quiet):
        exp, tokenizer, template, train, held_out, initial = self.pair_inputs(
            exp, mesh, param_shardings, quiet, reward_model=False
        )
        if exp.model.lora is not None and not exp.posttrain.reference:
            # LoRA: the reference is the policy with its adapters switched off, i.e. the frozen base
            # every step already reads; no second copy of the weights, and nothing to precompute.
            exp = exp.replace(posttrain=dataclasses.replace(exp.posttrain, reference_logprobs="online"))
            data = inputs_lib.pair_data(exp, train, held_out, tokenizer, template)
            return exp, StageInputs(data, initial_params=initial, frozen=lora_training.BASE)
        if exp.model.lora is not None:  # the state holds adapters; a reference is a whole model
            param_shardings = lora_training.base_shardings(self.module(exp), exp, mesh, quantized=False)
        reference = inputs_lib.reference_params(exp, initial, self.module(exp), param_shardings)
        frozen = None
        if exp.posttrain.reference_logprobs == "online":
            frozen = reference
        else:
            for pairs in (train, held_out):
                inputs_lib.annotate_reference_log_probs(pairs, reference, exp, mesh, param_shardings)
            del reference
        data = inputs_lib.pair_data(exp, train, held_out, tokenizer, template)
        return exp, StageInputs(data, initial_params=initial, frozen=frozen)
