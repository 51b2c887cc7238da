"""GRPO (DeepSeekMath, 2402.03300): `python -m llama_jax.train` with posttrain.stage="grpo".

PPO without a value model. Each of train.steps iterations:
  1. takes the next train.batch_size prompts (the same seeded order as PPO) and samples
     `posttrain.group_size` responses to each with the jitted KV-cache decoder;
  2. scores them (the reward model, a scoring function, or Llama 2's pair of reward models, as
     for PPO); a response's advantage is its score less its group's mean, over the group's
     standard deviation, the same on every one of its tokens;
  3. takes one optimizer step per minibatch of responses, for ppo.epochs passes: the clipped
     surrogate of the advantage plus ppo.kl_coef x the KL to the frozen reference as a loss term
     (not folded into the reward as PPO does), averaged over each response's tokens.
The sampling, minibatch, epochs, clip, kl_coef and eval_prompts settings are `posttrain.ppo`'s.
The state is a plain `TrainState`: `generate`, `eval` and a later stage load a GRPO run like any.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from llama_jax import lora_training
from llama_jax.config import ConfigError, Experiment
from llama_jax.data.training import TrainingData
from llama_jax.loss import next_token
from llama_jax.model import Llama
from llama_jax.optim import make_optimizer
from llama_jax.posttrain import inputs as inputs_lib
from llama_jax.posttrain import losses
from llama_jax.posttrain.ppo import PPOIterations, load_prompts_for, scorer_for, starting_params
from llama_jax.posttrain.stages import ChatStage
from llama_jax.posttrain.steps import next_token_log_probs
from llama_jax.sharding import MeshError, activation_sharding, data_parallel_size
from llama_jax.steps import NONFINITE, TrainState, abstract_state, state_shardings
from llama_jax.trainer import Run, register_stage


def check_grpo(exp: Experiment, mesh) -> None:
    settings, group = exp.posttrain.ppo, exp.posttrain.group_size
    if group < 2:
        raise ConfigError(
            f"GRPO needs posttrain.group_size of at least 2, got {group}: each response's advantage "
            "is its score against the other responses to the same prompt."
        )
    if lora_training.enabled(exp):
        raise ConfigError("GRPO trains the whole model for now; LoRA is not supported with it (PPO has it).")
    if jax.process_count() > 1:
        raise ConfigError("GRPO runs on one host for now (its rollouts are generated on one process).")
    if exp.train.seq_len > exp.model.max_seq_len:
        raise ConfigError(
            f"train.seq_len={exp.train.seq_len} is longer than the model's max_seq_len={exp.model.max_seq_len}."
        )
    if settings.max_new_tokens >= exp.train.seq_len:
        raise ConfigError("ppo.max_new_tokens must leave room for the prompt within train.seq_len.")
    responses = exp.train.batch_size * group
    if responses % settings.minibatch_size:
        raise ConfigError(
            f"train.batch_size x posttrain.group_size = {responses} responses per iteration is not a "
            f"multiple of ppo.minibatch_size={settings.minibatch_size}."
        )
    if settings.minibatch_size % data_parallel_size(mesh):
        raise MeshError(
            f"ppo.minibatch_size={settings.minibatch_size} is not divisible by the "
            f"data-parallel size {data_parallel_size(mesh)}."
        )
    if bool(exp.posttrain.reward_model) == bool(exp.posttrain.score_fn):
        raise ConfigError("GRPO needs exactly one of posttrain.reward_model and posttrain.score_fn.")


def make_grpo_functions(exp: Experiment, optimizer):
    """(prepare, update): the jitted pieces of an iteration. `prepare` gives the rollouts their
    masks, log-probs under the sampling policy and the reference, and advantages."""
    cfg, settings, chunk = exp.model, exp.posttrain.ppo, exp.train.loss_chunk
    group = exp.posttrain.group_size

    def log_probs_of(params, batch):
        return next_token_log_probs(params, cfg, batch["tokens"], batch["segment_ids"], chunk)

    @jax.jit
    def prepare(params, reference, batch, scores):
        rollouts = {
            **batch,
            "mask": next_token(batch["response_mask"]),
            "old_log_probs": log_probs_of(params, batch),
            "ref_log_probs": log_probs_of(reference, batch),
            "advantages": losses.group_advantages(scores, group),
        }
        spread = jnp.mean(jnp.std(scores.reshape(-1, group), axis=1))
        return rollouts, {"group_score_std": spread}

    def loss(params, minibatch):
        return losses.grpo_loss(
            log_probs_of(params, minibatch),
            minibatch["old_log_probs"],
            minibatch["ref_log_probs"],
            minibatch["advantages"],
            minibatch["mask"],
            settings.clip,
            settings.kl_coef,
        )

    @jax.jit
    def update(state: TrainState, minibatch):
        (value, stats), grads = jax.value_and_grad(loss, has_aux=True)(state.params, minibatch)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        grad_norm = optax.tree.norm(grads)
        # A minibatch whose loss or gradient is not finite is not applied (train.on_nonfinite).
        finite = jnp.isfinite(value) & jnp.isfinite(grad_norm)
        updated = state.replace(params=optax.apply_updates(state.params, updates), opt_state=opt_state)
        new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), updated, state)
        return new_state, {
            "policy_loss": value,
            **stats,
            "grad_norm": grad_norm,
            NONFINITE: 1.0 - finite.astype(jnp.float32),
        }

    return prepare, update


class GRPOIterations(PPOIterations):
    """One GRPO iteration: PPO's prompts, sampler and scorer, a group of responses per prompt."""

    def step(self, state: TrainState, iteration: int):
        exp, settings, group = self.exp, self.exp.posttrain.ppo, self.exp.posttrain.group_size
        prompts = [p for p in self.prompts_for(iteration) for _ in range(group)]
        batch, responses, scores = self.rollouts(
            state.params, prompts, exp.train.seed * 1_000_003 + iteration, settings.sampling
        )
        data, stats = self.advantages(state.params, self.reference, batch, jnp.asarray(scores))
        state, fetched = self.minibatch_updates(state, data, len(prompts), iteration)
        return state, self.metrics(scores, responses, stats, fetched, iteration)


@register_stage("grpo")
class GRPO(ChatStage):
    """Each step of the loop is one GRPO iteration: grouped rollouts, scores, updates."""

    unit = "iteration"
    latest_metrics = ()

    def check(self, exp: Experiment, mesh) -> None:
        check_grpo(exp, mesh)

    def start(self, exp: Experiment, mesh, quiet: bool = False) -> Run:
        exp, tokenizer, template = inputs_lib.tokenizer_and_template(exp, quiet)
        prompts, eval_prompts = load_prompts_for(exp, tokenizer, template)
        settings = exp.posttrain
        host_policy, host_reference = starting_params(exp)
        scorer = scorer_for(exp, mesh)
        responses = exp.train.batch_size * settings.group_size
        updates_per_iteration = settings.ppo.epochs * responses // settings.ppo.minibatch_size
        optimizer, schedule = make_optimizer(exp.optim, exp.train.steps * updates_per_iteration)
        rules = exp.mesh.rules
        shardings = state_shardings(Llama(exp.model), optimizer, mesh, rules)
        reference = jax.device_put(host_reference, shardings.params)

        def fresh_state(params):
            return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params))

        def init_state():
            with activation_sharding(mesh, rules):
                return jax.jit(fresh_state, in_shardings=(shardings.params,), out_shardings=shardings)(
                    host_policy
                )

        iterations = GRPOIterations(
            exp,
            tokenizer,
            prompts,
            eval_prompts,
            scorer,
            reference,
            make_grpo_functions(exp, optimizer),
            schedule,
            updates_per_iteration,
        )
        data = TrainingData(None, None, tokenizer, exp.train.sample_prompt, chat_template=template)
        return Run(
            exp=exp,
            abstract_state=abstract_state(lambda: fresh_state(host_policy), shardings),
            init_state=init_state,
            step=iterations.step,
            evaluate=iterations.evaluate if eval_prompts else None,
            sample=self._sampler(exp, data),
            tokenizer_path=exp.data.tokenizer_path,
            summary=(
                f"GRPO, {exp.train.steps} iterations of {exp.train.batch_size} prompts x "
                f"{settings.group_size} responses, {updates_per_iteration} updates each; {len(prompts)} "
                f"prompts, {len(eval_prompts)} held out; reward from {settings.reward_model or settings.score_fn}"
            ),
            progress=lambda last: {"score": f"{last['score']:.3f}", "kl": f"{last['kl']:.3f}"},
        )
