"""What a post-training run needs before its first step: the tokenizer and chat format, the data
of its stage, the parameters it starts from and, for DPO, the reference (the stages in
`posttrain/stages.py` and `posttrain/ppo.py` put them together).

Starting points (`init_from`, which may also be a Hugging Face or Meta directory, see init_from.py;
`posttrain.reference`, `posttrain.reward_model`) are parameters checkpoints (`checkpoint.save_params`, `python -m llama_jax.convert`) or training
workdirs (their newest checkpoint). A checkpoint of another architecture than the experiment's
model is refused with one sentence naming the fields that differ.

The tokenizer: `data.tokenizer_path` if set, else init_from's (init_from.source_tokenizer).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from llama_jax.chat_template import default_template
from llama_jax.checkpoint import CheckpointError
from llama_jax.config import ConfigError, Experiment, ModelConfig, architecture_differences
from llama_jax.data.training import DataError, TrainingData, cached_tokenizer, training_data
from llama_jax.init_from import load_model, source_kind, source_params, source_tokenizer
from llama_jax.posttrain import data as pdata
from llama_jax.posttrain.steps import pair_batch_shardings, response_log_probs
from llama_jax.scalar_model import from_llama
from llama_jax.sharding import activation_sharding
from llama_jax.steps import global_batch
from llama_jax.tokenizer import load_tokenizer


def load_checkpoint_params(path: str, cfg: ModelConfig, what: str, *, reward_model: bool = False):
    """Host parameters from `path`, checked against `cfg` and cast to its param_dtype: a Llama's,
    or with `reward_model` a ScalarModel's (a Llama checkpoint gets a zero head)."""
    if not Path(path).exists():
        raise CheckpointError(f"The {what} {path} does not exist.")
    found, params = load_model(path)  # a LoRA run: its adapters folded into its base
    differing = architecture_differences(found, cfg)
    if differing:
        changes = ", ".join(f"{k} {ours} where the experiment has {theirs}" for k, ours, theirs in differing)
        raise CheckpointError(f"The {what} {path} is a model of another shape ({changes}).")
    is_reward_model = "score" in params
    if is_reward_model and not reward_model:
        raise CheckpointError(f"The {what} {path} is a reward model, not a language model.")
    if reward_model and not is_reward_model:
        if "tok_embeddings" not in params:
            raise CheckpointError(f"The {what} {path} holds neither a Llama nor a reward model.")
        params = from_llama(params, cfg)
    dtype = np.dtype(cfg.param_dtype)
    return jax.tree.map(lambda x: np.asarray(x).astype(dtype), params)


def recorded_tokenizer(path: str) -> str | None:
    """The tokenizer a checkpoint was trained or exported with, if it says."""
    return source_tokenizer(path)


def resolve_tokenizer(exp: Experiment, quiet: bool = False) -> Experiment:
    """`exp` with data.tokenizer_path set (see the module docstring)."""
    if exp.data.tokenizer_path:
        return exp
    if exp.init_from:  # with_source already took the source's tokenizer if it has one
        raise ConfigError(
            f"{exp.init_from} records no tokenizer; set data.tokenizer_path to the one the checkpoint "
            "was trained with."
        )
    if exp.posttrain.stage != "sft":
        raise ConfigError(
            f"The {exp.posttrain.stage} stage needs data.tokenizer_path (or an init_from that has "
            "its tokenizer)."
        )
    try:
        path = cached_tokenizer(exp.data, exp.model.vocab_size, quiet)  # as pretraining does
    except (FileNotFoundError, ValueError) as err:
        raise DataError(str(err).rstrip(".") + ".") from None
    return exp.replace(data=dataclasses.replace(exp.data, tokenizer_path=path))


def _with_chat_template(data, template: str):
    if data is None:
        return None
    sources = tuple(
        s if s.chat_template else dataclasses.replace(s, chat_template=template) for s in data.sources
    )
    return dataclasses.replace(data, sources=sources)


def tokenizer_and_template(exp: Experiment, quiet: bool = False):
    """(exp with its tokenizer resolved, the tokenizer, the chat template's name)."""
    exp = resolve_tokenizer(exp, quiet)
    try:
        tokenizer = load_tokenizer(exp.data.tokenizer_path)
    except (OSError, ValueError) as err:
        raise DataError(str(err).rstrip(".") + ".") from None
    if tokenizer.vocab_size > exp.model.vocab_size:
        raise DataError(
            f"The tokenizer {exp.data.tokenizer_path} has {tokenizer.vocab_size} tokens but "
            f"model.vocab_size is {exp.model.vocab_size}."
        )
    return exp, tokenizer, exp.posttrain.chat_template or default_template(tokenizer)


def initial_params(exp: Experiment, *, reward_model: bool = False):
    """Host parameters of init_from (None: a random start, for tests); with `reward_model`, a
    ScalarModel's (a language model gets a zero head; a reward model checkpoint is taken whole)."""
    if not exp.init_from:
        return None
    if source_kind(exp.init_from) == "llama_jax":
        return load_checkpoint_params(
            exp.init_from, exp.model, "init_from checkpoint", reward_model=reward_model
        )
    params = source_params(exp.init_from, exp.model)
    return from_llama(params, exp.model) if reward_model else params


def chat_data(exp: Experiment, template: str, quiet: bool = False) -> tuple[Experiment, TrainingData]:
    """SFT's data: the experiment's chat sources in `template` (where they name none)."""
    exp = exp.replace(
        data=_with_chat_template(exp.data, template),
        eval_data=_with_chat_template(exp.eval_data, template),
    )
    return exp, dataclasses.replace(training_data(exp, quiet=quiet), chat_template=template)


def reference_params(exp: Experiment, host_initial, module, param_shardings):
    """DPO's frozen reference on the mesh: posttrain.reference, else the starting parameters."""
    if exp.posttrain.reference:
        host = load_checkpoint_params(exp.posttrain.reference, exp.model, "reference checkpoint")
        return jax.device_put(host, param_shardings)
    if host_initial is not None:
        return jax.device_put(host_initial, param_shardings)
    # No checkpoints (tests): the policy's own random start, made again.
    init = lambda rng: nn.meta.unbox(module.init(rng, jnp.zeros((1, 1), jnp.int32))["params"])  # noqa: E731
    return jax.jit(init, out_shardings=param_shardings)(jax.random.key(exp.train.seed))


def _source_paths(data) -> list[str]:
    return [path for source in data.sources for path in source.paths]


def load_pairs(exp: Experiment, tokenizer, template: str) -> tuple[list[dict], list[dict]]:
    """(train pairs, held-out pairs): eval_data's file, or a seeded split of the training file."""
    settings = exp.posttrain
    load = lambda data: pdata.load_pairs(  # noqa: E731
        _source_paths(data),
        tokenizer,
        template,
        seq_len=exp.train.seq_len,
        mask_special_tokens=settings.mask_special_tokens,
        name=data.sources[0].display_name,
    )
    try:
        pairs = load(exp.data)
        if exp.eval_data is not None:
            return pairs, load(exp.eval_data)
        return pdata.split_holdout(pairs, settings.eval_fraction, exp.data.seed or exp.train.seed)
    except (FileNotFoundError, ValueError) as err:
        raise DataError(str(err).rstrip(".") + ".") from None


def pair_data(exp: Experiment, train_pairs, eval_pairs, tokenizer, template) -> TrainingData:
    processes, process = jax.process_count(), jax.process_index()
    common = dict(
        seq_len=exp.train.seq_len,
        batch_size=exp.train.batch_size // processes,
        process_index=process,
        process_count=processes,
    )
    try:
        train = pdata.pair_batches(
            train_pairs, seed=exp.data.seed or exp.train.seed, shuffle=exp.data.shuffle, **common
        )
    except ValueError as err:
        raise DataError(str(err).rstrip(".") + ".") from None
    eval_fn = None
    if eval_pairs:
        filled = pdata.fill_to_multiple(eval_pairs, exp.train.batch_size)
        eval_fn = lambda: pdata.pair_batches(filled, seed=0, shuffle=False, num_epochs=1, **common)  # noqa: E731
    return TrainingData(
        train=train,
        eval=eval_fn,
        tokenizer=tokenizer,
        sample_prompt=exp.train.sample_prompt,
        chat_template=template,
    )


def _local_rows(array) -> np.ndarray:
    """This process's rows of a global array split along its first axis, in order."""
    shards = {s.index[0].start or 0: np.asarray(s.data) for s in array.addressable_shards}
    return np.concatenate([shards[k] for k in sorted(shards)])


def annotate_reference_log_probs(
    pairs: list[dict], reference, exp: Experiment, mesh, param_shardings
) -> None:
    """Adds `reference_chosen` and `reference_rejected` (the reference's response log-probs) to
    this process's share of `pairs` (the ones its batches will read), in one pass up front."""
    if not pairs:
        return
    processes = jax.process_count()
    share = pairs[jax.process_index() :: processes]
    local_size = exp.train.batch_size // processes
    n_batches = math.ceil(math.ceil(len(pairs) / processes) / local_size)  # the same on every process
    shardings = {k: v for k, v in pair_batch_shardings(exp, mesh).items() if not k.startswith("reference_")}
    score = jax.jit(
        lambda p, b: response_log_probs(p, exp.model, b, exp.train.loss_chunk),
        in_shardings=(param_shardings, shardings),
    )
    with activation_sharding(mesh, exp.mesh.rules):
        for i in range(n_batches):
            rows = share[i * local_size : (i + 1) * local_size]
            filled = rows + [share[0]] * (local_size - len(rows))
            local = {
                k: np.stack([pdata.pad_pair(p, exp.train.seq_len)[k] for p in filled]) for k in shardings
            }
            chosen, rejected = (_local_rows(x) for x in score(reference, global_batch(local, shardings)))
            for pair, c, r in zip(rows, chosen, rejected):
                pair["reference_chosen"], pair["reference_rejected"] = np.float32(c), np.float32(r)
