"""Scoring sampled responses: with a trained reward model, or with a user's Python function.

    scorer = load_scorer(reward_model="runs/llama3_8b_rm")       # or score_fn="mymodule:score"
    scores = scorer(records, prompt_ids, response_ids, texts)    # [N] floats
    scorer = load_scorer(reward_model=..., safety_reward_model="runs/llama3_8b_safety_rm")

A reward model scores the token ids it is given, prompt + response (the response with the token
that ended it), at the last token: the same sequence it was trained on. A scoring function is
called as `fn(prompt, response) -> float`, with `prompt` the prompt's JSONL record (its own
fields, e.g. a reference answer, plus "messages", the normalised conversation) and `response` the
reply's text. `module:function` names a module on the Python path or a .py file.

Llama 2 trains two reward models, helpfulness and safety, and gives PPO one score
(`SafetyGatedScorer`, docs/reference.md "Post-training"): the safety model's where the prompt is
tagged unsafe or the safety model judges the response unsafe (sigmoid(score) below a threshold,
0.15), the helpfulness model's otherwise. Scores are logits (a reward model's raw output); PPO
then whitens them over the batch.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import math
import sys
from pathlib import Path
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from llama_jax.config import ModelConfig
from llama_jax.scalar_model import ScalarModel, last_token_values


class ScoringError(ValueError):
    """A reward model or scoring function that cannot be used; one sentence for the user."""


@functools.partial(jax.jit, static_argnames="cfg")
def _reward_model_scores(params, tokens, segment_ids, *, cfg: ModelConfig):
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    values = ScalarModel(cfg).apply({"params": params}, tokens, positions, segment_ids)
    return last_token_values(values, segment_ids)


class RewardModelScorer:
    """Scores token sequences with a reward model (`ScalarModel` parameters), `batch_size` rows at
    a time, lengths rounded up to a multiple of `bucket` so that few shapes compile."""

    def __init__(self, cfg: ModelConfig, params, batch_size: int = 16, bucket: int = 64):
        self.cfg, self.params = cfg, params
        self.batch_size, self.bucket = batch_size, bucket

    def score_tokens(self, sequences: Sequence[Sequence[int]]) -> np.ndarray:
        too_long = [len(s) for s in sequences if len(s) > self.cfg.max_seq_len]
        if too_long:
            raise ScoringError(
                f"A sequence of {max(too_long)} tokens is longer than the reward model's "
                f"context of {self.cfg.max_seq_len}."
            )
        scores = []
        for start in range(0, len(sequences), self.batch_size):
            rows = sequences[start : start + self.batch_size]
            length = min(self.cfg.max_seq_len, self.bucket * math.ceil(max(map(len, rows)) / self.bucket))
            tokens = np.zeros((self.batch_size, length), np.int32)
            segment_ids = np.zeros((self.batch_size, length), np.int32)
            segment_ids[len(rows) :, 0] = 1  # filler rows: one token, ignored
            for i, row in enumerate(rows):
                tokens[i, : len(row)] = row
                segment_ids[i, : len(row)] = 1
            out = _reward_model_scores(self.params, tokens, segment_ids, cfg=self.cfg)
            scores.append(np.asarray(out)[: len(rows)])
        return np.concatenate(scores).astype(np.float64)

    def __call__(self, records, prompt_ids, response_ids, texts) -> np.ndarray:
        return self.score_tokens([list(p) + list(r) for p, r in zip(prompt_ids, response_ids)])


class FunctionScorer:
    """Scores (prompt record, response text) with a Python function."""

    def __init__(self, fn: Callable, name: str):
        self.fn, self.name = fn, name

    def __call__(self, records, prompt_ids, response_ids, texts) -> np.ndarray:
        scores = []
        for record, text in zip(records, texts):
            try:
                score = float(self.fn(record, text))
            except Exception as err:  # noqa: BLE001 - the user's code; report it in one sentence
                raise ScoringError(
                    f"The scoring function {self.name} failed on a response ({type(err).__name__}: {err})."
                ) from err
            if not math.isfinite(score):
                raise ScoringError(f"The scoring function {self.name} returned {score}.")
            scores.append(score)
        return np.asarray(scores, np.float64)


class SafetyGatedScorer:
    """Llama 2's combination of a helpfulness and a safety scorer: per response, the safety score
    where `record[unsafe_field]` is true or sigmoid(safety score) < `threshold`, else the
    helpfulness score. `safety_share` is the share of the last call's responses scored by safety."""

    def __init__(self, helpful, safety, threshold: float = 0.15, unsafe_field: str = "unsafe"):
        if not 0.0 < threshold < 1.0:
            raise ScoringError(f"The safety threshold is a probability in (0, 1), got {threshold}.")
        self.helpful, self.safety = helpful, safety
        self.threshold, self.unsafe_field = threshold, unsafe_field
        self.safety_share = 0.0

    def __call__(self, records, prompt_ids, response_ids, texts) -> np.ndarray:
        helpful = np.asarray(self.helpful(records, prompt_ids, response_ids, texts), np.float64)
        safety = np.asarray(self.safety(records, prompt_ids, response_ids, texts), np.float64)
        tagged = np.array([bool(r.get(self.unsafe_field)) if hasattr(r, "get") else False for r in records])
        # sigmoid(s) < threshold, written as s < logit(threshold)
        use_safety = tagged | (safety < math.log(self.threshold / (1.0 - self.threshold)))
        self.safety_share = float(use_safety.mean()) if len(use_safety) else 0.0
        return np.where(use_safety, safety, helpful)


def load_function(spec: str) -> Callable:
    """The function named by "module:function" or "path/to/file.py:function"."""
    module_name, sep, function = spec.rpartition(":")
    if not sep or not module_name or not function:
        raise ScoringError(f"--score {spec!r} is not of the form module:function.")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            # Registered in sys.modules under a name of its own while it runs, as an import
            # would be: dataclasses, pickling and typing look the module up there.
            name = f"_llama_jax_scoring_{path.stem}_{abs(hash(str(path.resolve())))}"
            loader_spec = importlib.util.spec_from_file_location(name, path)
            if loader_spec is None or not path.is_file():
                raise ImportError(f"no file {module_name}")
            module = importlib.util.module_from_spec(loader_spec)
            sys.modules[name] = module
            try:
                loader_spec.loader.exec_module(module)
            except BaseException:
                del sys.modules[name]
                raise
        else:
            if "" not in sys.path:
                sys.path.insert(0, "")  # the current directory, as `python -m` would have it
            module = importlib.import_module(module_name)
    except Exception as err:  # noqa: BLE001 - import errors of any kind in the user's module
        raise ScoringError(
            f"Cannot import {module_name} for scoring ({type(err).__name__}: {err})."
        ) from None
    fn = getattr(module, function, None)
    if not callable(fn):
        raise ScoringError(f"{module_name} has no function {function!r}.")
    return fn


def load_reward_model(path: str, vocab_size: int | None = None) -> tuple[ModelConfig, dict]:
    """(cfg, params) of a reward model checkpoint (an `rm` run's workdir or an export of one)."""
    from llama_jax.checkpoint import CheckpointError
    from llama_jax.init_from import load_model

    if not Path(path).exists():
        raise ScoringError(f"The reward model {path} does not exist.")
    try:
        cfg, params = load_model(path)
    except CheckpointError as err:
        raise ScoringError(str(err)) from None
    if "score" not in params:
        raise ScoringError(f"{path} is a language model, not a reward model (no scalar head).")
    if vocab_size is not None and cfg.vocab_size != vocab_size:
        raise ScoringError(
            f"The reward model {path} has a vocabulary of {cfg.vocab_size} tokens and the "
            f"policy one of {vocab_size}: they do not share a tokenizer."
        )
    return cfg, params


def load_scorer(
    *,
    reward_model: str = "",
    score_fn: str = "",
    vocab_size: int | None = None,
    batch_size: int = 16,
    safety_reward_model: str = "",
    safety_score_fn: str = "",
    safety_threshold: float = 0.15,
    unsafe_field: str = "unsafe",
):
    """A RewardModelScorer or FunctionScorer (exactly one of the two must be given); with a safety
    reward model or function as well, the two combined as Llama 2 does (SafetyGatedScorer)."""

    def one(model: str, fn: str, what: str):
        if bool(model) == bool(fn):
            raise ScoringError(
                f"Give either a {what}reward model or a {what}scoring function (module:function), "
                "not both or neither."
            )
        if fn:
            return FunctionScorer(load_function(fn), fn)
        cfg, params = load_reward_model(model, vocab_size)
        return RewardModelScorer(cfg, params, batch_size=batch_size)

    helpful = one(reward_model, score_fn, "")
    if not (safety_reward_model or safety_score_fn):
        return helpful
    return SafetyGatedScorer(
        helpful, one(safety_reward_model, safety_score_fn, "safety "), safety_threshold, unsafe_field
    )
