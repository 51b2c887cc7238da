"""What a post-training run needs before its first step: the tokenizer and chat format, the data
of its stage, the parameters it starts from and, for DPO, the reference.

    exp, inputs = prepare(exp, compiled_steps, mesh)   # called by train.train

Starting points (`posttrain.init_from`, `posttrain.reference`, `posttrain.reward_model`) are
parameters checkpoints (`checkpoint.save_params`, `python -m llama_jax.convert`) or training
workdirs (their newest checkpoint). A checkpoint of another architecture than the experiment's
model is refused with one sentence naming the fields that differ.

The tokenizer: `data.tokenizer_path` if set, else the one the `init_from` run recorded in its
experiment.json (or a `tokenizer.model` beside an exported checkpoint).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import jax
import numpy as np

from llama_jax.checkpoint import CheckpointError, load_for_inference
from llama_jax.config import ConfigError, Experiment, ModelConfig
from llama_jax.data.training import DataError, TrainingData, cached_tokenizer, training_data
from llama_jax.posttrain import data as pdata
from llama_jax.tokenizer import load_tokenizer

# ModelConfig fields two checkpoints must share to be the same architecture.
ARCHITECTURE_FIELDS = (
    "dim",
    "n_layers",
    "n_heads",
    "n_kv_heads",
    "head_dim",
    "ffn_dim",
    "vocab_size",
    "tie_embeddings",
    "scan_layers",
    "rope_theta",
    "rope_scaling",
    "norm_eps",
)


def check_same_architecture(found: ModelConfig, expected: ModelConfig, what: str) -> None:
    differing = [k for k in ARCHITECTURE_FIELDS if getattr(found, k) != getattr(expected, k)]
    if differing:
        changes = ", ".join(
            f"{k} {getattr(found, k)} where the experiment has {getattr(expected, k)}" for k in differing
        )
        raise CheckpointError(f"The {what} is a model of another shape ({changes}).")


def load_checkpoint_params(path: str, cfg: ModelConfig, what: str, *, reward_model: bool = False):
    """Host parameters from `path`, checked against `cfg` and cast to its param_dtype: a Llama's,
    or with `reward_model` a ScalarModel's (a Llama checkpoint gets a zero head)."""
    if not Path(path).exists():
        raise CheckpointError(f"The {what} {path} does not exist.")
    found, params = load_for_inference(path)
    check_same_architecture(found, cfg, f"{what} {path}")
    is_reward_model = "score" in params
    if is_reward_model and not reward_model:
        raise CheckpointError(f"The {what} {path} is a reward model, not a language model.")
    if reward_model and not is_reward_model:
        if "tok_embeddings" not in params:
            raise CheckpointError(f"The {what} {path} holds neither a Llama nor a reward model.")
        params = {
            "backbone": {k: v for k, v in params.items() if k != "output"},
            "score": {"kernel": np.zeros((cfg.dim, 1)), "bias": np.zeros((1,))},
        }
    dtype = np.dtype(cfg.param_dtype)
    return jax.tree.map(lambda x: np.asarray(x).astype(dtype), params)


def recorded_tokenizer(path: str) -> str | None:
    """The tokenizer a checkpoint was trained or exported with, if it says."""
    root = Path(path)
    for candidate in (root, root.parent.parent):  # a workdir, or its checkpoints/STEP
        record = candidate / "experiment.json"
        if record.is_file():
            recorded = json.loads(record.read_text()).get("data", {}).get("tokenizer_path")
            if recorded:
                if not Path(recorded).is_file():
                    raise ConfigError(
                        f"{record} names the tokenizer {recorded}, which no longer "
                        "exists; set data.tokenizer_path."
                    )
                return recorded
    beside = root / "tokenizer.model"
    return str(beside) if beside.is_file() else None


def resolve_tokenizer(exp: Experiment, quiet: bool = False) -> Experiment:
    """`exp` with data.tokenizer_path set (see the module docstring)."""
    init_from = exp.posttrain.init_from
    if init_from and not Path(init_from).exists():
        raise CheckpointError(f"The init_from checkpoint {init_from} does not exist.")
    if exp.data.tokenizer_path:
        return exp
    path = recorded_tokenizer(exp.posttrain.init_from) if exp.posttrain.init_from else None
    if path is None:
        if exp.posttrain.init_from:
            raise ConfigError(
                f"{exp.posttrain.init_from} records no tokenizer; set data.tokenizer_path "
                "to the one the checkpoint was trained with."
            )
        if exp.posttrain.stage != "sft":
            raise ConfigError(
                f"The {exp.posttrain.stage} stage needs data.tokenizer_path (or an "
                "init_from run that records its tokenizer)."
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


def prepare(exp: Experiment, steps, mesh, quiet: bool = False):
    """(exp with its tokenizer resolved, train.StageInputs) for an SFT, reward-model or DPO run."""
    from llama_jax.train import StageInputs

    exp = resolve_tokenizer(exp, quiet)
    settings = exp.posttrain
    try:
        tokenizer = load_tokenizer(exp.data.tokenizer_path)
    except (OSError, ValueError) as err:
        raise DataError(str(err).rstrip(".") + ".") from None
    if tokenizer.vocab_size > exp.model.vocab_size:
        raise DataError(
            f"The tokenizer {exp.data.tokenizer_path} has {tokenizer.vocab_size} tokens but "
            f"model.vocab_size is {exp.model.vocab_size}."
        )
    template = settings.chat_template or tokenizer.default_chat_template
    param_shardings = steps.state_shardings.params
    host_initial = None
    if settings.init_from:
        host_initial = load_checkpoint_params(
            settings.init_from, exp.model, "init_from checkpoint", reward_model=settings.stage == "rm"
        )

    if settings.stage == "sft":
        exp = exp.replace(
            data=_with_chat_template(exp.data, template),
            eval_data=_with_chat_template(exp.eval_data, template),
        )
        data = dataclasses.replace(training_data(exp, quiet=quiet), chat_template=template)
        return exp, StageInputs(data, initial_params=host_initial)

    train_pairs, eval_pairs = _load_pairs(exp, tokenizer, template)
    frozen = None
    if settings.stage == "dpo":
        if settings.reference:
            reference = jax.device_put(
                load_checkpoint_params(settings.reference, exp.model, "reference checkpoint"), param_shardings
            )
        elif host_initial is not None:
            reference = jax.device_put(host_initial, param_shardings)
        else:  # no checkpoints (tests): the policy's own random start, made again
            reference = jax.jit(lambda rng: _init_params(exp, rng), out_shardings=param_shardings)(
                jax.random.key(exp.train.seed)
            )
        if settings.reference_logprobs == "online":
            frozen = reference
        else:
            for pairs in (train_pairs, eval_pairs):
                annotate_reference_log_probs(pairs, reference, exp, mesh, param_shardings)
            del reference
    data = _pair_data(exp, train_pairs, eval_pairs, tokenizer, template)
    return exp, StageInputs(data, initial_params=host_initial, frozen=frozen)


def _init_params(exp: Experiment, rng):
    import flax.linen as nn
    import jax.numpy as jnp

    from llama_jax.train import model_module

    return nn.meta.unbox(model_module(exp).init(rng, jnp.zeros((1, 1), jnp.int32))["params"])


def _source_paths(data) -> list[str]:
    return [path for source in data.sources for path in source.paths]


def _load_pairs(exp: Experiment, tokenizer, template: str) -> tuple[list[dict], list[dict]]:
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


def _pair_data(exp: Experiment, train_pairs, eval_pairs, tokenizer, template) -> TrainingData:
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
    from llama_jax.posttrain.steps import pair_batch_shardings, response_log_probs
    from llama_jax.sharding import activation_sharding
    from llama_jax.train import global_batch

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
    with activation_sharding(mesh):
        for i in range(n_batches):
            rows = share[i * local_size : (i + 1) * local_size]
            filled = rows + [share[0]] * (local_size - len(rows))
            local = {
                k: np.stack([pdata.pad_pair(p, exp.train.seq_len)[k] for p in filled]) for k in shardings
            }
            chosen, rejected = (_local_rows(x) for x in score(reference, global_batch(local, shardings)))
            for pair, c, r in zip(rows, chosen, rejected):
                pair["reference_chosen"], pair["reference_rejected"] = np.float32(c), np.float32(r)
