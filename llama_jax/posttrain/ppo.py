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
import json
from pathlib import Path
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from llama_jax.checkpoint import TrainCheckpointer
from llama_jax.config import ConfigError, Experiment, ModelConfig
from llama_jax.data.training import DataError
from llama_jax.metrics import MetricsWriter
from llama_jax.model import Llama
from llama_jax.optim import make_optimizer
from llama_jax.posttrain import losses
from llama_jax.posttrain.heads import ScalarModel, last_token_values
from llama_jax.posttrain.steps import _next, next_token_log_probs
from llama_jax.sharding import MeshError, activation_sharding, data_parallel_size, make_mesh, tree_shardings


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


def make_ppo_functions(exp: Experiment, value_cfg: ModelConfig, policy_opt, value_opt, schedule):
    """(score_rollouts, advantages, update): the jitted pieces of an iteration.

    Per-token arrays are indexed by the position that predicts the token (t predicts t + 1), so
    the mask of the actions is `_next(response_mask)` and V_t is the value model at position t."""
    cfg, settings, chunk = exp.model, exp.posttrain.ppo, exp.train.loss_chunk

    @jax.jit
    def reward_model_scores(rm_params, batch):
        return last_token_values(_values(rm_params, value_cfg, batch), batch["segment_ids"])

    @jax.jit
    def advantages(params, reference, value_params, batch, scores):
        mask = _next(batch["response_mask"])
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

    def policy_loss(params, minibatch):
        log_probs = next_token_log_probs(params, cfg, minibatch["tokens"], minibatch["segment_ids"], chunk)
        return losses.ppo_policy_loss(
            log_probs, minibatch["old_log_probs"], minibatch["advantages"], minibatch["mask"], settings.clip
        )

    def value_loss(value_params, minibatch):
        return losses.ppo_value_loss(
            _values(value_params, value_cfg, minibatch),
            minibatch["old_values"],
            minibatch["returns"],
            minibatch["mask"],
            settings.value_clip,
        )

    @jax.jit
    def update(state: PPOState, minibatch):
        (loss, stats), grads = jax.value_and_grad(policy_loss, has_aux=True)(state.params, minibatch)
        updates, opt_state = policy_opt.update(grads, state.opt_state, state.params)
        v_loss, v_grads = jax.value_and_grad(value_loss)(state.value_params, minibatch)
        v_updates, value_opt_state = value_opt.update(v_grads, state.value_opt_state, state.value_params)
        new_state = state.replace(
            params=optax.apply_updates(state.params, updates),
            opt_state=opt_state,
            value_params=optax.apply_updates(state.value_params, v_updates),
            value_opt_state=value_opt_state,
        )
        return new_state, {
            "policy_loss": loss,
            "value_loss": v_loss,
            **stats,
            "grad_norm": optax.tree.norm(grads),
            "value_grad_norm": optax.tree.norm(v_grads),
        }

    return reward_model_scores, advantages, update


def _shardings(module: nn.Module, optimizer, mesh):
    """(params, opt_state) shardings of `module` from its parameters' logical axes."""

    def init_boxed(rng):
        params = module.init(rng, jnp.zeros((1, 1), jnp.int32))["params"]
        return params, optimizer.init(params)

    boxed = jax.eval_shape(init_boxed, jax.random.key(0))
    return tree_shardings(nn.meta.unbox(boxed), nn.get_partition_spec(boxed), mesh)


def _prompt_ids(prompts, tokenizer, template, max_prompt_len, name):
    from llama_jax.data.sources import COUNTERS, SKIPPED

    kept = []
    for prompt in prompts:
        try:
            ids = tokenizer.encode_chat(prompt["messages"], template=template, add_generation_prompt=True).ids
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


def _check(exp: Experiment, mesh) -> None:
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


def train_ppo(exp: Experiment, workdir: str | Path, *, quiet: bool = False) -> dict:
    """Runs PPO, resuming from WORKDIR/checkpoints if it can; returns the last logged metrics and
    the final `state` (a PPOState)."""
    from llama_jax.generate import generate
    from llama_jax.posttrain.data import load_prompts
    from llama_jax.posttrain.reward import FunctionScorer, ScoringError, load_function, load_reward_model
    from llama_jax.posttrain.stages import load_checkpoint_params, resolve_tokenizer
    from llama_jax.tokenizer import load_tokenizer

    workdir = Path(workdir)
    mesh = make_mesh(exp.mesh)
    _check(exp, mesh)
    settings, ppo = exp.posttrain, exp.posttrain.ppo
    exp = resolve_tokenizer(exp, quiet)
    tokenizer = load_tokenizer(exp.data.tokenizer_path)
    if tokenizer.vocab_size > exp.model.vocab_size:
        raise DataError(
            f"The tokenizer {exp.data.tokenizer_path} has {tokenizer.vocab_size} tokens but "
            f"model.vocab_size is {exp.model.vocab_size}."
        )
    template = settings.chat_template or tokenizer.default_chat_template
    say = (lambda *a: None) if quiet else tqdm.write

    # Prompts: the training file, and held-out ones (eval_data, or the first ppo.eval_prompts).
    name = exp.data.sources[0].display_name
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

    # Models: policy, frozen reference, value model, and the reward (a model or a function).
    policy_module = Llama(exp.model)
    if settings.init_from:
        host_policy = load_checkpoint_params(settings.init_from, exp.model, "init_from checkpoint")
    else:  # tests: a random start
        host_policy = jax.device_get(
            nn.meta.unbox(
                policy_module.init(jax.random.key(exp.train.seed), jnp.zeros((1, 1), jnp.int32))["params"]
            )
        )
    host_reference = (
        load_checkpoint_params(settings.reference, exp.model, "reference checkpoint")
        if settings.reference
        else host_policy
    )
    try:
        if settings.reward_model:
            value_cfg, rm_params = load_reward_model(settings.reward_model, exp.model.vocab_size)
            if value_cfg.max_seq_len < exp.train.seq_len:
                raise ScoringError(
                    f"The reward model's context ({value_cfg.max_seq_len}) is shorter "
                    f"than train.seq_len={exp.train.seq_len}."
                )
            host_value = jax.tree.map(lambda x: np.asarray(x, np.dtype(value_cfg.param_dtype)), rm_params)
            scorer = None
        else:
            value_cfg, rm_params = exp.model, None
            host_value = {
                "backbone": {k: v for k, v in host_policy.items() if k != "output"},
                "score": {
                    "kernel": np.zeros((exp.model.dim, 1), np.float32),
                    "bias": np.zeros((1,), np.float32),
                },
            }
            scorer = FunctionScorer(load_function(settings.score_fn), settings.score_fn)
    except ScoringError as err:
        raise ConfigError(str(err)) from None

    updates_per_iteration = ppo.epochs * exp.train.batch_size // ppo.minibatch_size
    policy_opt, schedule = make_optimizer(exp.optim, exp.train.steps * updates_per_iteration)
    value_optim = dataclasses.replace(exp.optim, peak_lr=ppo.value_lr or exp.optim.peak_lr)
    value_opt, _ = make_optimizer(value_optim, exp.train.steps * updates_per_iteration)
    policy_sh, policy_opt_sh = _shardings(policy_module, policy_opt, mesh)
    value_sh, value_opt_sh = _shardings(ScalarModel(value_cfg), value_opt, mesh)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    state_sh = PPOState(
        step=replicated,
        params=policy_sh,
        opt_state=policy_opt_sh,
        value_params=value_sh,
        value_opt_state=value_opt_sh,
    )
    reference = jax.device_put(host_reference, policy_sh)
    rm_params = (
        None
        if rm_params is None
        else jax.device_put(
            jax.tree.map(lambda x: np.asarray(x, np.dtype(value_cfg.param_dtype)), rm_params), value_sh
        )
    )
    reward_model_scores, advantages_fn, update = make_ppo_functions(
        exp, value_cfg, policy_opt, value_opt, schedule
    )

    def fresh_state(policy, value):
        return PPOState(
            step=jnp.zeros((), jnp.int32),
            params=policy,
            opt_state=policy_opt.init(policy),
            value_params=value,
            value_opt_state=value_opt.init(value),
        )

    checkpoints = TrainCheckpointer(workdir, exp.checkpoint)
    experiment_json = json.loads(json.dumps(dataclasses.asdict(exp), default=str))
    restored = None
    with activation_sharding(mesh):
        if exp.checkpoint.resume:
            shapes = jax.eval_shape(fresh_state, host_policy, host_value)
            target = jax.tree.map(
                lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, state_sh
            )
            restored = checkpoints.restore_latest(target, None, model=exp.model)
        if restored is None:
            state = jax.jit(fresh_state, in_shardings=(policy_sh, value_sh), out_shardings=state_sh)(
                host_policy, host_value
            )
        else:
            state, restored_step = restored
            say(f"resumed from {checkpoints.directory / str(restored_step)}")
    del host_policy, host_value, host_reference
    start = int(state.step)
    if start >= exp.train.steps:
        say(f"{exp.name}: already trained to iteration {start}; nothing to do.")
        checkpoints.close()
        return {"state": state}

    def score(batch_prompts, responses, batch):
        if rm_params is not None:
            return np.asarray(reward_model_scores(rm_params, batch))
        stops = set(tokenizer.stop_ids)
        texts = [tokenizer.decode([t for t in r if t not in stops]).strip() for r in responses]
        records = [{**p["record"], "messages": p["messages"]} for p in batch_prompts]
        return scorer(records, [p["ids"] for p in batch_prompts], responses, texts)

    def rollouts(params, batch_prompts, seed, temperature):
        responses = generate(
            params,
            exp.model,
            [p["ids"] for p in batch_prompts],
            ppo.max_new_tokens,
            temperature=temperature,
            top_k=ppo.top_k,
            top_p=ppo.top_p,
            stop_tokens=tokenizer.stop_ids,
            seed=seed,
            prompt_bucket=max_prompt_len,
        )
        batch = rollout_batch([p["ids"] for p in batch_prompts], responses, exp.train.seq_len)
        try:
            scores = score(batch_prompts, responses, batch)
        except ScoringError as err:
            raise ConfigError(str(err)) from None
        return batch, responses, np.asarray(scores, np.float32)

    def evaluate(params) -> float:
        total = 0.0
        for i in range(0, len(eval_prompts), exp.train.batch_size):
            chunk = eval_prompts[i : i + exp.train.batch_size]
            _, _, scores = rollouts(params, chunk, 0, 0.0)
            total += float(np.sum(scores))
        return total / len(eval_prompts)

    def prompts_for(iteration: int) -> list[dict]:
        """The iteration's prompts: positions iteration*B .. of the seeded passes over the prompts."""
        chosen = []
        for position in range(iteration * exp.train.batch_size, (iteration + 1) * exp.train.batch_size):
            epoch, index = divmod(position, len(prompts))
            order = np.random.default_rng([exp.train.seed, epoch]).permutation(len(prompts))
            chosen.append(prompts[order[index]])
        return chosen

    say(
        f"{exp.name}: PPO, {exp.train.steps} iterations of {exp.train.batch_size} prompts, "
        f"{updates_per_iteration} updates each; {len(prompts)} prompts, {len(eval_prompts)} held out; "
        f"reward from {settings.reward_model or settings.score_fn}; workdir {workdir}"
    )
    writer = MetricsWriter(workdir, enabled=jax.process_index() == 0)
    writer.drop_after(start)
    (workdir / "experiment.json").write_text(json.dumps(experiment_json, indent=1))
    bar = tqdm(
        total=exp.train.steps,
        initial=start,
        desc=exp.name,
        unit="it",
        disable=quiet or None,
        dynamic_ncols=True,
    )
    last: dict = {}
    window: list[dict] = []
    every = exp.checkpoint.every_steps
    with activation_sharding(mesh):
        for iteration in range(start, exp.train.steps):
            batch_prompts = prompts_for(iteration)
            batch, responses, scores = rollouts(
                state.params, batch_prompts, exp.train.seed * 1_000_003 + iteration, ppo.temperature
            )
            data, stats = advantages_fn(
                state.params, reference, state.value_params, batch, jnp.asarray(scores)
            )
            rng = np.random.default_rng([exp.train.seed, iteration, 1])
            update_metrics = []
            for _ in range(ppo.epochs):
                order = rng.permutation(exp.train.batch_size)
                for i in range(0, exp.train.batch_size, ppo.minibatch_size):
                    rows = order[i : i + ppo.minibatch_size]
                    state, metrics = update(state, {k: v[rows] for k, v in data.items()})
                    update_metrics.append(metrics)
            state = state.replace(step=state.step + 1)
            fetched = jax.device_get(update_metrics)
            row = {
                "score": float(np.mean(scores)),
                "response_length": float(np.mean([len(r) for r in responses])),
                **{k: float(v) for k, v in jax.device_get(stats).items()},
                **{k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]},
                "lr": float(schedule((iteration + 1) * updates_per_iteration - 1)),
            }
            window.append(row)
            done = iteration + 1
            if done % exp.train.log_every == 0 or done == exp.train.steps:
                last = {k: float(np.mean([w[k] for w in window])) for k in window[-1]}
                writer.write(done, last)
                bar.set_postfix(score=f"{last['score']:.3f}", kl=f"{last['kl']:.3f}")
                window = []
            if eval_prompts and (done % exp.train.eval_every == 0 or done == exp.train.steps):
                last["eval_score"] = evaluate(state.params)
                writer.write(done, {"eval_score": last["eval_score"]})
                say(f"iteration {done}: eval score {last['eval_score']:.4f}")
            bar.update()
            if (every and done % every == 0) or done == exp.train.steps:
                checkpoints.save(done, state, None, experiment_json)
    bar.close()
    checkpoints.close()
    writer.close()
    last["state"] = state
    return last
