"""PPO as in Llama 2: `python -m llama_jax.train --exp=llama3_8b_ppo` (posttrain.stage="ppo").

Each of train.steps iterations:
  1. takes the next train.batch_size prompts (a seeded order, reshuffled every pass) and samples
     one response each with `generate`, the jitted KV-cache decoder;
  2. scores prompt + response with the reward model (or `posttrain.score_fn`), whitened over the
     batch (Llama 2); per-token rewards are -kl_coef * (log pi - log ref) on every response token
     plus the score on the last one;
  3. computes values (the value model: a Llama with a scalar head, started from the reward model
     as in Llama 2, else from the policy with a zero head), GAE advantages (whitened) and returns;
  4. takes one optimizer step per minibatch of the rollouts for ppo.epochs passes: the clipped
     policy objective for the policy, the clipped value loss for the value model.
Metrics go to WORKDIR/metrics.jsonl (score, kl, reward, losses, clip fraction, response length;
with held-out prompts, `eval_score` of greedy responses); checkpoints hold a `PPOState` whose
`params` are the policy's, so `generate`, `eval` and a later stage load a PPO run like any other.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from llama_jax import lora as lora_lib
from llama_jax import lora_training
from llama_jax.chat_template import encode_chat
from llama_jax.config import ConfigError, Experiment, ModelConfig
from llama_jax.data.sources import COUNTERS, SKIPPED
from llama_jax.data.training import DataError, TrainingData
from llama_jax.generate import generate
from llama_jax.loss import next_token
from llama_jax.model import Llama, init_params
from llama_jax.optim import make_optimizer
from llama_jax.posttrain import inputs as inputs_lib
from llama_jax.posttrain import losses
from llama_jax.posttrain.data import load_prompts
from llama_jax.posttrain.reward import RewardModelScorer, ScoringError, load_scorer
from llama_jax.posttrain.stages import ChatStage
from llama_jax.posttrain.steps import next_token_log_probs
from llama_jax.scalar_model import ScalarModel, from_llama
from llama_jax.sharding import MeshError, activation_sharding, data_parallel_size
from llama_jax.steps import NONFINITE, abstract_state, state_shardings
from llama_jax.trainer import Run, register_stage


@flax.struct.dataclass
class PPOState:
    step: jax.Array  # PPO iterations done
    params: Any  # the policy (named as in TrainState, for load_for_inference)
    opt_state: Any
    value_params: Any
    value_opt_state: Any


def rollout_batch(prompts: list[list[int]], responses: list[list[int]], length: int) -> dict[str, np.ndarray]:
    """Prompt + response per row, right-padded to `length`: tokens, segment_ids (1 on the sequence)
    and response_mask (1 on the response's tokens, the stop token included) [B, length]."""
    batch = {
        "tokens": np.zeros((len(prompts), length), np.int32),
        "segment_ids": np.zeros((len(prompts), length), np.int32),
        "response_mask": np.zeros((len(prompts), length), np.float32),
    }
    for row, (prompt, response) in enumerate(zip(prompts, responses)):
        sequence = (list(prompt) + list(response))[:length]
        batch["tokens"][row, : len(sequence)] = sequence
        batch["segment_ids"][row, : len(sequence)] = 1
        batch["response_mask"][row, len(prompt) : len(sequence)] = 1
    return batch


def _values(params, cfg, batch):
    return ScalarModel(cfg).apply({"params": params}, batch["tokens"], None, batch["segment_ids"])


def whole(bases, params, value_params):
    """(policy, value model) as whole parameter trees: with LoRA (`bases` = their frozen bases)
    the trained adapters joined to them, else as they are."""
    if bases is None:
        return params, value_params
    return lora_lib.merge(bases[0], params), lora_lib.merge(bases[1], value_params)


def make_ppo_functions(exp: Experiment, value_cfg: ModelConfig, policy_opt, value_opt, schedule):
    """(advantages, update): the jitted pieces of an iteration. Both take `bases` last: None, or
    with LoRA the (policy, value model) frozen bases that PPOState's adapters are trained on.

    Per-token arrays are indexed by the position that predicts the token (t predicts t + 1), so
    the mask of the actions is `next_token(response_mask)` and V_t is the value model at position t."""
    cfg, settings, chunk = exp.model, exp.posttrain.ppo, exp.train.loss_chunk

    @jax.jit
    def advantages(params, reference, value_params, batch, scores, bases=None):
        params, value_params = whole(bases, params, value_params)
        mask = next_token(batch["response_mask"])
        log_probs = next_token_log_probs(params, cfg, batch["tokens"], batch["segment_ids"], chunk)
        ref_log_probs = next_token_log_probs(reference, cfg, batch["tokens"], batch["segment_ids"], chunk)
        values = _values(value_params, value_cfg, batch)
        if settings.whiten_scores:
            scores = losses.whiten(scores, jnp.ones_like(scores))
        rewards, kl = losses.kl_penalized_rewards(scores, log_probs, ref_log_probs, mask, settings.kl_coef)
        advantage, returns = losses.gae(rewards, values, mask, settings.gamma, settings.lam)
        rollouts = {
            **batch,
            "mask": mask,
            "old_log_probs": log_probs,
            "old_values": values * mask,
            "advantages": losses.whiten(advantage, mask),
            "returns": returns,
        }
        stats = {
            "kl": jnp.mean(jnp.sum(kl, axis=-1)),
            "reward": jnp.mean(jnp.sum(rewards, axis=-1)),
            "value": losses.masked_mean(values, mask),
            "return": losses.masked_mean(returns, mask),
        }
        return rollouts, stats

    def policy_loss(params, minibatch, bases):
        params, _ = whole(bases, params, {})
        log_probs = next_token_log_probs(params, cfg, minibatch["tokens"], minibatch["segment_ids"], chunk)
        return losses.ppo_policy_loss(
            log_probs, minibatch["old_log_probs"], minibatch["advantages"], minibatch["mask"], settings.clip
        )

    def value_loss(value_params, minibatch, bases):
        _, value_params = whole(bases, {}, value_params)
        return losses.ppo_value_loss(
            _values(value_params, value_cfg, minibatch),
            minibatch["old_values"],
            minibatch["returns"],
            minibatch["mask"],
            settings.value_clip,
        )

    @jax.jit
    def update(state: PPOState, minibatch, bases=None):
        (loss, stats), grads = jax.value_and_grad(policy_loss, has_aux=True)(state.params, minibatch, bases)
        updates, opt_state = policy_opt.update(grads, state.opt_state, state.params)
        v_loss, v_grads = jax.value_and_grad(value_loss)(state.value_params, minibatch, bases)
        v_updates, value_opt_state = value_opt.update(v_grads, state.value_opt_state, state.value_params)
        updated = state.replace(
            params=optax.apply_updates(state.params, updates),
            opt_state=opt_state,
            value_params=optax.apply_updates(state.value_params, v_updates),
            value_opt_state=value_opt_state,
        )
        grad_norm, value_grad_norm = optax.tree.norm(grads), optax.tree.norm(v_grads)
        # As in steps.make_train_step: a minibatch whose losses or gradients are not finite is not
        # applied (policy and value alike); the loop then stops or skips (train.on_nonfinite).
        finite = jnp.all(jnp.isfinite(jnp.stack([loss, v_loss, grad_norm, value_grad_norm])))
        new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), updated, state)
        return new_state, {
            "policy_loss": loss,
            "value_loss": v_loss,
            **stats,
            "grad_norm": grad_norm,
            "value_grad_norm": value_grad_norm,
            NONFINITE: 1.0 - finite.astype(jnp.float32),
        }

    return advantages, update


def _prompt_ids(prompts, tokenizer, template, max_prompt_len, name):
    kept = []
    for prompt in prompts:
        try:
            ids = encode_chat(
                tokenizer, prompt["messages"], template=template, add_generation_prompt=True
            ).ids
        except ValueError as err:
            COUNTERS.add(name, SKIPPED, f": prompt {prompt['id']}: {err}")
            continue
        if len(ids) > max_prompt_len:
            COUNTERS.add(
                name,
                SKIPPED,
                f": prompt {prompt['id']} is longer than train.seq_len - "
                f"ppo.max_new_tokens = {max_prompt_len} tokens",
            )
            continue
        kept.append({**prompt, "ids": ids})
    return kept


def check_ppo(exp: Experiment, mesh) -> None:
    settings = exp.posttrain.ppo
    if jax.process_count() > 1:
        raise ConfigError("PPO runs on one host for now (its rollouts are generated on one process).")
    if exp.train.seq_len > exp.model.max_seq_len:
        raise ConfigError(
            f"train.seq_len={exp.train.seq_len} is longer than the model's "
            f"max_seq_len={exp.model.max_seq_len}."
        )
    if settings.max_new_tokens >= exp.train.seq_len:
        raise ConfigError("ppo.max_new_tokens must leave room for the prompt within train.seq_len.")
    if exp.train.batch_size % settings.minibatch_size:
        raise ConfigError(
            f"train.batch_size={exp.train.batch_size} (prompts per iteration) is not a "
            f"multiple of ppo.minibatch_size={settings.minibatch_size}."
        )
    if settings.minibatch_size % data_parallel_size(mesh):
        raise MeshError(
            f"ppo.minibatch_size={settings.minibatch_size} is not divisible by the "
            f"data-parallel size {data_parallel_size(mesh)}."
        )
    if bool(exp.posttrain.reward_model) == bool(exp.posttrain.score_fn):
        raise ConfigError("PPO needs exactly one of posttrain.reward_model and posttrain.score_fn.")


def load_prompts_for(exp: Experiment, tokenizer, template) -> tuple[list[dict], list[dict]]:
    """(training prompts, held-out prompts), tokenized: the training file, and eval_data's or
    the first ppo.eval_prompts of a seeded order of the training file."""
    ppo, name = exp.posttrain.ppo, exp.data.sources[0].display_name
    max_prompt_len = exp.train.seq_len - ppo.max_new_tokens
    try:
        prompts = load_prompts([p for s in exp.data.sources for p in s.paths], name)
        eval_prompts = []
        if exp.eval_data is not None:
            eval_prompts = load_prompts(
                [p for s in exp.eval_data.sources for p in s.paths], exp.eval_data.sources[0].display_name
            )
        elif ppo.eval_prompts:
            order = np.random.default_rng(exp.train.seed).permutation(len(prompts))
            held = set(order[: ppo.eval_prompts].tolist())
            eval_prompts = [prompts[i] for i in sorted(held)]
            prompts = [p for i, p in enumerate(prompts) if i not in held]
    except (FileNotFoundError, ValueError) as err:
        raise DataError(str(err).rstrip(".") + ".") from None
    prompts = _prompt_ids(prompts, tokenizer, template, max_prompt_len, name)
    eval_prompts = _prompt_ids(eval_prompts, tokenizer, template, max_prompt_len, name)
    if not prompts:
        raise DataError(
            f"{name} has no prompt that fits in train.seq_len - ppo.max_new_tokens = {max_prompt_len} tokens."
        )
    return prompts, eval_prompts


def starting_params(exp: Experiment):
    """(host policy, host reference): init_from's parameters (a random start without it, for
    tests) and posttrain.reference's, by default the policy's own."""
    host_policy = inputs_lib.initial_params(exp)
    if host_policy is None:  # tests: a random start
        host_policy = jax.device_get(init_params(exp.model, jax.random.key(exp.train.seed)))
    reference = exp.posttrain.reference
    if not reference:
        return host_policy, host_policy
    return host_policy, inputs_lib.load_checkpoint_params(reference, exp.model, "reference checkpoint")


def _models(exp: Experiment):
    """(host policy, host reference, value model config, host value model, scorer). The value
    model starts from the reward model (Llama 2), or from the policy with a zero head."""
    host_policy, host_reference = starting_params(exp)
    scorer = _load_scorer(exp)
    if isinstance(scorer, RewardModelScorer):
        value_cfg = scorer.cfg
        host_value = jax.tree.map(lambda x: np.asarray(x, np.dtype(value_cfg.param_dtype)), scorer.params)
    else:
        value_cfg, host_value = exp.model, from_llama(host_policy, exp.model)
    return host_policy, host_reference, value_cfg, host_value, scorer


def _load_scorer(exp: Experiment):
    """The scorer of exp's posttrain settings (reward models or functions), on the host; what
    cannot be used is one sentence (ConfigError)."""
    settings = exp.posttrain
    try:
        scorer = load_scorer(
            reward_model=settings.reward_model,
            score_fn=settings.score_fn,
            vocab_size=exp.model.vocab_size,
            safety_reward_model=settings.safety_reward_model,
            safety_score_fn=settings.safety_score_fn,
            safety_threshold=settings.safety_threshold,
        )
        if isinstance(scorer, RewardModelScorer) and scorer.cfg.max_seq_len < exp.train.seq_len:
            raise ScoringError(
                f"The reward model's context ({scorer.cfg.max_seq_len}) is shorter than "
                f"train.seq_len={exp.train.seq_len}."
            )
    except ScoringError as err:
        raise ConfigError(str(err)) from None
    return scorer


def scorer_for(exp: Experiment, mesh):
    """`_load_scorer`, a reward model's parameters placed on the mesh."""
    scorer = _load_scorer(exp)
    if isinstance(scorer, RewardModelScorer):
        placed = state_shardings(ScalarModel(scorer.cfg), optax.identity(), mesh, exp.mesh.rules).params
        scorer.params = jax.device_put(scorer.params, placed)
    return scorer


def _frozen_inputs(exp, mesh, value_cfg, host_policy, host_value, host_reference, policy_shardings):
    """(bases, reference) on the mesh: with LoRA the (policy, value model) frozen bases, else None;
    the reference, which under LoRA is the policy's base itself (adapters off, no second copy)
    unless posttrain.reference names a checkpoint."""
    if not lora_training.enabled(exp):
        return None, jax.device_put(host_reference, policy_shardings.params)
    bases = (
        lora_training.place_base(Llama(exp.model), exp, mesh, host_policy),
        lora_training.place_base(ScalarModel(value_cfg), exp.replace(model=value_cfg), mesh, host_value),
    )
    if not exp.posttrain.reference:
        return bases, bases[0]
    plain = lora_training.base_shardings(Llama(exp.model), exp, mesh, quantized=False)
    return bases, jax.device_put(host_reference, plain)


def _ppo_shardings(exp: Experiment, mesh, value_cfg, policy_opt, value_opt):
    """(the policy's state shardings, the value model's, the PPOState's); under LoRA only the
    adapters (and the value model's head) are trained state."""
    rules, trainable = exp.mesh.rules, lora_training.trainable_part(exp)
    policy = state_shardings(Llama(exp.model), policy_opt, mesh, rules, trainable)
    value = state_shardings(ScalarModel(value_cfg), value_opt, mesh, rules, trainable)
    shardings = PPOState(
        step=policy.step,
        params=policy.params,
        opt_state=policy.opt_state,
        value_params=value.params,
        value_opt_state=value.opt_state,
    )
    return policy, value, shardings


def _summary(exp: Experiment, updates_per_iteration: int, prompts: int, held_out: int) -> str:
    settings = exp.posttrain
    return (
        f"PPO, {exp.train.steps} iterations of {exp.train.batch_size} prompts, "
        f"{updates_per_iteration} updates each; {prompts} prompts, {held_out} held out; "
        f"reward from {settings.reward_model or settings.score_fn}"
    )


@register_stage("ppo")
class PPO(ChatStage):
    """Each step of the loop is one PPO iteration: rollouts, scores, advantages, updates."""

    unit = "iteration"
    latest_metrics = ()  # every metric is averaged over the iterations logged

    def check(self, exp: Experiment, mesh) -> None:
        check_ppo(exp, mesh)

    def start(self, exp: Experiment, mesh, quiet: bool = False) -> Run:
        exp, tokenizer, template = inputs_lib.tokenizer_and_template(exp, quiet)
        prompts, eval_prompts = load_prompts_for(exp, tokenizer, template)
        host_policy, host_reference, value_cfg, host_value, scorer = _models(exp)
        ppo = exp.posttrain.ppo
        updates_per_iteration = ppo.epochs * exp.train.batch_size // ppo.minibatch_size
        total_updates = exp.train.steps * updates_per_iteration
        policy_opt, schedule = make_optimizer(exp.optim, total_updates)
        value_optim = dataclasses.replace(exp.optim, peak_lr=ppo.value_lr or exp.optim.peak_lr)
        value_opt, _ = make_optimizer(value_optim, total_updates)
        rules = exp.mesh.rules
        lora = lora_training.enabled(exp)
        scorer_cfg = value_cfg
        if lora:  # the value model trains its own adapters (and its head) on its frozen base
            value_cfg = value_cfg.replace(lora=exp.model.lora)
        policy, value, shardings = _ppo_shardings(exp, mesh, value_cfg, policy_opt, value_opt)
        if isinstance(scorer, RewardModelScorer):  # scored on the mesh, sharded as the value model
            whole_value = state_shardings(ScalarModel(scorer_cfg), value_opt, mesh, rules).params
            scorer.params = jax.device_put(host_value, whole_value)
        bases, reference = _frozen_inputs(
            exp, mesh, value_cfg, host_policy, host_value, host_reference, policy
        )
        functions = make_ppo_functions(exp, value_cfg, policy_opt, value_opt, schedule)

        def fresh_state(policy_params, value_params):
            return PPOState(
                step=jnp.zeros((), jnp.int32),
                params=policy_params,
                opt_state=policy_opt.init(policy_params),
                value_params=value_params,
                value_opt_state=value_opt.init(value_params),
            )

        def initial_trainable(rng):
            """With LoRA: fresh adapters for both, the value model's head as it starts (the
            reward model's, or zero)."""
            p = lora_training.fresh_trainable(Llama(exp.model), exp, rng)
            v = lora_training.fresh_trainable(ScalarModel(value_cfg), exp, rng)
            return p, {**v, "score": jax.tree.map(jnp.asarray, host_value["score"])}

        def init_state():
            with activation_sharding(mesh, rules):
                init = jax.jit(
                    fresh_state, in_shardings=(policy.params, value.params), out_shardings=shardings
                )
                if lora:
                    fresh = jax.jit(initial_trainable, out_shardings=(policy.params, value.params))
                    return init(*fresh(jax.random.key(exp.train.seed)))
                return init(host_policy, host_value)

        iterations = PPOIterations(
            exp,
            tokenizer,
            prompts,
            eval_prompts,
            scorer,
            reference,
            functions,
            schedule,
            updates_per_iteration,
            bases,
        )
        data = TrainingData(None, None, tokenizer, exp.train.sample_prompt, chat_template=template)
        return Run(
            exp=exp,
            abstract_state=abstract_state(
                (lambda: fresh_state(*initial_trainable(jax.random.key(0))))
                if lora
                else (lambda: fresh_state(host_policy, host_value)),
                shardings,
            ),
            init_state=init_state,
            step=iterations.step,
            evaluate=iterations.evaluate if eval_prompts else None,
            sample=self._sampler(exp, data, lambda state: whole(bases, state.params, {})[0]),
            tokenizer_path=exp.data.tokenizer_path,
            summary=_summary(exp, updates_per_iteration, len(prompts), len(eval_prompts)),
            progress=lambda last: {"score": f"{last['score']:.3f}", "kl": f"{last['kl']:.3f}"},
        )


class PPOIterations:
    """One PPO iteration on the host: rollouts with the shared sampler, scores, then the jitted
    advantages and minibatch updates."""

    def __init__(
        self,
        exp,
        tokenizer,
        prompts,
        eval_prompts,
        scorer,
        reference,
        functions,
        schedule,
        updates,
        bases=None,
    ):
        self.exp, self.tokenizer, self.scorer = exp, tokenizer, scorer
        self.bases = bases  # with LoRA: the (policy, value model) frozen bases
        self.prompts, self.eval_prompts = prompts, eval_prompts
        self.reference = reference  # the frozen reference's parameters, on the mesh
        self.advantages, self.update = functions
        self.schedule, self.updates_per_iteration = schedule, updates

    def prompts_for(self, iteration: int) -> list[dict]:
        """The iteration's prompts: positions iteration*B .. of the seeded passes over the prompts."""
        exp, chosen = self.exp, []
        for position in range(iteration * exp.train.batch_size, (iteration + 1) * exp.train.batch_size):
            epoch, index = divmod(position, len(self.prompts))
            order = np.random.default_rng([exp.train.seed, epoch]).permutation(len(self.prompts))
            chosen.append(self.prompts[order[index]])
        return chosen

    def rollouts(self, params, batch_prompts, seed: int, sampling):
        exp, tokenizer = self.exp, self.tokenizer
        prompt_ids = [p["ids"] for p in batch_prompts]
        responses = generate(
            params,
            exp.model,
            prompt_ids,
            sampling,
            stop_tokens=tokenizer.stop_ids,
            seed=seed,
            prompt_bucket=exp.train.seq_len - sampling.max_new_tokens,
        )
        batch = rollout_batch(prompt_ids, responses, exp.train.seq_len)
        stops = set(tokenizer.stop_ids)
        texts = [tokenizer.decode([t for t in r if t not in stops]).strip() for r in responses]
        records = [{**p["record"], "messages": p["messages"]} for p in batch_prompts]
        try:
            scores = self.scorer(records, prompt_ids, responses, texts)
        except ScoringError as err:
            raise ConfigError(str(err)) from None
        return batch, responses, np.asarray(scores, np.float32)

    def step(self, state: PPOState, iteration: int):
        exp, ppo = self.exp, self.exp.posttrain.ppo
        policy = whole(self.bases, state.params, {})[0]
        batch, responses, scores = self.rollouts(
            policy, self.prompts_for(iteration), exp.train.seed * 1_000_003 + iteration, ppo.sampling
        )
        data, stats = self.advantages(
            state.params, self.reference, state.value_params, batch, jnp.asarray(scores), self.bases
        )
        state, fetched = self.minibatch_updates(state, data, exp.train.batch_size, iteration, self.bases)
        return state, self.metrics(scores, responses, stats, fetched, iteration)

    def minibatch_updates(self, state, data, rows: int, iteration: int, *extra):
        """ppo.epochs passes of `update` over seeded minibatches of the `rows` rollouts in `data`;
        (state, each update's metrics on the host)."""
        ppo = self.exp.posttrain.ppo
        rng = np.random.default_rng([self.exp.train.seed, iteration, 1])
        update_metrics = []
        for _ in range(ppo.epochs):
            order = rng.permutation(rows)
            for i in range(0, rows, ppo.minibatch_size):
                minibatch = order[i : i + ppo.minibatch_size]
                state, metrics = self.update(state, {k: v[minibatch] for k, v in data.items()}, *extra)
                update_metrics.append(metrics)
        return state.replace(step=state.step + 1), jax.device_get(update_metrics)

    def metrics(self, scores, responses, stats, fetched, iteration: int) -> dict[str, float]:
        """The iteration's logged metrics: scores, lengths, `stats` and the updates' means."""
        return {
            "score": float(np.mean(scores)),
            "response_length": float(np.mean([len(r) for r in responses])),
            # With two reward models: the share of responses the safety model scored.
            **({"safety_share": self.scorer.safety_share} if hasattr(self.scorer, "safety_share") else {}),
            **{k: float(v) for k, v in jax.device_get(stats).items()},
            **{k: float(np.mean([m[k] for m in fetched])) for k in fetched[0] if k != NONFINITE},
            # 1 if any minibatch update of this iteration was dropped as non-finite
            NONFINITE: float(max(m[NONFINITE] for m in fetched)),
            "lr": float(self.schedule((iteration + 1) * self.updates_per_iteration - 1)),
        }

    def evaluate(self, state: PPOState) -> dict[str, float]:
        """The mean score of greedy responses to the held-out prompts."""
        greedy = dataclasses.replace(self.exp.posttrain.ppo.sampling, temperature=0.0)
        total, size = 0.0, self.exp.train.batch_size
        for i in range(0, len(self.eval_prompts), size):
            policy = whole(self.bases, state.params, {})[0]
            _, _, scores = self.rollouts(policy, self.eval_prompts[i : i + size], 0, greedy)
            total += float(np.sum(scores))
        return {"eval_score": total / len(self.eval_prompts)}
