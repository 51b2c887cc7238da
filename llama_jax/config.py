"""Model configuration and the presets of every published Llama size.

A preset is a fact about the family (docs/reference.md, "Architectures"); what to train it on, with which mesh and
recipe, is an experiment and lives in `experiments/`.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib.util
import math
import re
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from llama_jax.data.config import STDLIB_EVAL, STDLIB_TRAIN, DataConfig
from llama_jax.ranges import below_one, check_ranges, fraction, non_negative, positive

REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "splash", "cudnn")  # the same as attention.IMPLEMENTATIONS


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1 frequency-dependent RoPE scaling (Hugging Face `rope_type: "llama3"`)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self):
        check_ranges(
            "model.rope_scaling",
            self,
            [
                ("factor", positive, "positive"),
                ("low_freq_factor", positive, "positive"),
                ("high_freq_factor", positive, "positive"),
                ("original_max_position_embeddings", positive, "at least 1"),
            ],
        )
        if self.high_freq_factor <= self.low_freq_factor:
            raise ValueError(
                f"model.rope_scaling.high_freq_factor ({self.high_freq_factor}) must be larger than "
                f"low_freq_factor ({self.low_freq_factor})."
            )


# The weights LoRA can adapt: every matrix of attention and the feed-forward, and the LM head.
LORA_TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3", "output")
# How QLoRA stores the frozen base's matrices: int8 with a scale per output channel, or 4-bit NF4
# in blocks of 64 with double-quantized block scales (the QLoRA paper's storage).
LORA_BASE_QUANTIZATIONS = ("", "int8", "nf4")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Low-rank adapters (docs/reference.md, "LoRA"): each targeted weight W [d_in, d_out] gains
    A [d_in, rank] (normal, std 1/rank) and B [rank, d_out] (zeros, so training starts from the base
    exactly) and computes x W + (alpha / rank) dropout(x) A B. Only A and B train; the base is frozen,
    and with `quantize_base` stored quantized (QLoRA)."""

    rank: int = 0  # 0: no adapters, every parameter trains
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("wq", "wv")
    quantize_base: str = ""  # "": as model.param_dtype; "int8" or "nf4" (QLoRA)

    def __post_init__(self):
        object.__setattr__(self, "targets", tuple(self.targets))
        check_ranges(
            "lora",
            self,
            [
                ("rank", non_negative, "at least 0 (0: no adapters)"),
                ("alpha", positive, "positive"),
                ("dropout", below_one, "in [0, 1)"),
            ],
        )
        unknown = [t for t in self.targets if t not in LORA_TARGETS]
        if unknown:
            raise ValueError(
                f"lora.targets names {', '.join(map(repr, unknown))}, which is not a weight LoRA can adapt; "
                f"choose from {', '.join(LORA_TARGETS)}."
            )
        if self.rank and not self.targets:
            raise ValueError("lora.targets is empty: name at least one weight to adapt.")
        if len(set(self.targets)) != len(self.targets):
            raise ValueError(f"lora.targets names a weight twice: {list(self.targets)}.")
        if self.quantize_base not in LORA_BASE_QUANTIZATIONS:
            raise ValueError(
                f"lora.quantize_base must be one of int8, nf4 or empty, not {self.quantize_base!r}."
            )

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def weight_sides(self, cfg: "ModelConfig") -> dict[str, tuple[int, int]]:
        """(d_in, d_out) of every targeted weight of `cfg`, as the matmul sees it."""
        q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        sides = {
            "wq": (cfg.dim, q),
            "wk": (cfg.dim, kv),
            "wv": (cfg.dim, kv),
            "wo": (q, cfg.dim),
            "w1": (cfg.dim, cfg.ffn_dim),
            "w3": (cfg.dim, cfg.ffn_dim),
            "w2": (cfg.ffn_dim, cfg.dim),
            "output": (cfg.dim, cfg.vocab_size),
        }
        return {t: sides[t] for t in self.targets}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    vocab_size: int
    max_seq_len: int
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    # Master weights. Compute dtype "auto" means bf16 on TPU/GPU and fp32 on CPU.
    param_dtype: str = "float32"
    compute_dtype: str = "auto"
    # Rematerialisation of each block in the backward pass: one of REMAT_POLICIES.
    remat: str = "none"
    # Stack the layers with nn.scan so compile time does not grow with depth.
    scan_layers: bool = True
    # Layers per iteration of that scan (n_layers: the loop fully unrolled, the parameters still
    # stacked). Not architecture: only the compiled program changes. A CPU setting: libtpu 0.0.42
    # aborts compiling an unrolled loop across slices, so `llama_jax.aot --slices N` compiles with 1.
    scan_unroll: int = 1
    # Standard deviation of the normal initialiser of every weight matrix.
    init_std: float = 0.02
    # Attention backend, see attention.IMPLEMENTATIONS: "auto" is splash on TPU, cuDNN on GPU,
    # XLA on CPU (and XLA wherever a kernel does not apply).
    attention: str = "auto"
    # Low-rank adapters on the weights (set from Experiment.lora; None: none). Not architecture:
    # the base's shapes do not change.
    lora: LoraConfig | None = None

    def __post_init__(self):
        if isinstance(self.lora, dict):  # as stored beside a checkpoint
            object.__setattr__(self, "lora", LoraConfig(**self.lora))
        sizes = (
            "dim",
            "n_layers",
            "n_heads",
            "n_kv_heads",
            "head_dim",
            "ffn_dim",
            "vocab_size",
            "max_seq_len",
        )
        check_ranges(
            "model",
            self,
            [(name, positive, "at least 1") for name in sizes]
            + [
                ("rope_theta", positive, "positive"),
                ("norm_eps", positive, "positive"),
                ("init_std", positive, "positive"),
                ("scan_unroll", positive, "at least 1"),
            ],
        )
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads "
                f"({self.n_kv_heads}) for grouped-query attention."
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}.")
        if self.attention not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(f"attention must be one of {ATTENTION_IMPLEMENTATIONS}, got {self.attention!r}.")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat must be one of {REMAT_POLICIES}, got {self.remat!r}.")
        for name in ("param_dtype", "compute_dtype"):
            value = getattr(self, name)
            if value != "auto" or name == "param_dtype":
                try:
                    floating = jnp.issubdtype(jnp.dtype(value), jnp.floating)
                except TypeError:
                    raise ValueError(f"ModelConfig.{name} is not a dtype: {value!r}.") from None
                if not floating:
                    raise ValueError(f"ModelConfig.{name} must be a floating dtype, got {value!r}.")

    @property
    def dtype(self) -> jnp.dtype:
        """The compute dtype, with "auto" resolved for the default backend."""
        if self.compute_dtype == "auto":
            return jnp.dtype(jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16)
        return jnp.dtype(self.compute_dtype)

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def num_params(self, *, include_embeddings: bool = True) -> int:
        """Parameter count by formula; `model.count_params` checks it against the real tree."""
        attn = self.dim * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)
        mlp = 3 * self.dim * self.ffn_dim
        per_layer = attn + mlp + 2 * self.dim
        embed = self.vocab_size * self.dim
        head = 0 if self.tie_embeddings else embed
        total = self.n_layers * per_layer + self.dim + head
        return total + embed if include_embeddings else total


def ffn_dim_for(dim: int, multiple_of: int, ffn_dim_multiplier: float | None = None) -> int:
    """Meta's rule for the SwiGLU hidden width: 2/3 of 4*dim, scaled, rounded up."""
    hidden = int(2 * 4 * dim / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * math.ceil(hidden / multiple_of)


def _llama(
    dim,
    n_layers,
    n_heads,
    n_kv_heads,
    multiple_of,
    mult,
    vocab,
    seq,
    theta,
    eps,
    head_dim=128,
    tied=False,
    scaling=None,
) -> ModelConfig:
    return ModelConfig(
        dim=dim,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        head_dim=head_dim,
        ffn_dim=ffn_dim_for(dim, multiple_of, mult),
        vocab_size=vocab,
        max_seq_len=seq,
        rope_theta=theta,
        rope_scaling=scaling,
        norm_eps=eps,
        tie_embeddings=tied,
    )


_L31 = RopeScaling(factor=8.0)
_L32 = RopeScaling(factor=32.0)

# The columns follow docs/reference.md, "Architectures": dim, layers, heads, kv heads, multiple_of, ffn multiplier,
# vocab, context, rope theta, norm eps.
PRESETS: dict[str, ModelConfig] = {
    "llama1_7b": _llama(4096, 32, 32, 32, 256, None, 32000, 2048, 1e4, 1e-6),
    "llama1_13b": _llama(5120, 40, 40, 40, 256, None, 32000, 2048, 1e4, 1e-6),
    "llama1_33b": _llama(6656, 60, 52, 52, 256, None, 32000, 2048, 1e4, 1e-6),
    "llama1_65b": _llama(8192, 80, 64, 64, 256, None, 32000, 2048, 1e4, 1e-5),
    "llama2_7b": _llama(4096, 32, 32, 32, 256, None, 32000, 4096, 1e4, 1e-5),
    "llama2_13b": _llama(5120, 40, 40, 40, 256, None, 32000, 4096, 1e4, 1e-5),
    "llama2_70b": _llama(8192, 80, 64, 8, 4096, 1.3, 32000, 4096, 1e4, 1e-5),
    "llama3_8b": _llama(4096, 32, 32, 8, 1024, 1.3, 128256, 8192, 5e5, 1e-5),
    "llama3_70b": _llama(8192, 80, 64, 8, 4096, 1.3, 128256, 8192, 5e5, 1e-5),
    "llama3_1_8b": _llama(4096, 32, 32, 8, 1024, 1.3, 128256, 131072, 5e5, 1e-5, scaling=_L31),
    "llama3_1_70b": _llama(8192, 80, 64, 8, 4096, 1.3, 128256, 131072, 5e5, 1e-5, scaling=_L31),
    "llama3_1_405b": _llama(16384, 126, 128, 8, 4096, 1.2, 128256, 131072, 5e5, 1e-5, scaling=_L31),
    "llama3_2_1b": _llama(
        2048, 16, 32, 8, 256, 1.5, 128256, 131072, 5e5, 1e-5, head_dim=64, tied=True, scaling=_L32
    ),
    "llama3_2_3b": _llama(3072, 28, 24, 8, 256, 1.0, 128256, 131072, 5e5, 1e-5, tied=True, scaling=_L32),
    # A toy of the Llama 3 shape (GQA, untied) for laptops and tests.
    "tiny": ModelConfig(
        dim=256,
        n_layers=4,
        n_heads=8,
        n_kv_heads=4,
        head_dim=32,
        ffn_dim=768,
        vocab_size=4096,
        max_seq_len=512,
        rope_theta=1e4,
        # Its four layers' loop unrolled: about 1.1x the scanned step's speed on a 2-core CPU
        # (`python experiments/bench_train.py --cpu-options`).
        scan_unroll=4,
    ),
}


# ModelConfig fields that fix the parameters' shapes: checkpoints that differ in one of them cannot
# load into each other.
PARAMETER_SHAPE_FIELDS = (
    "dim",
    "n_layers",
    "n_heads",
    "n_kv_heads",
    "head_dim",
    "ffn_dim",
    "vocab_size",
    "tie_embeddings",
    "scan_layers",
)
# ...and those that make the same parameters compute another function: a checkpoint must share
# all of these with the experiment that starts from it.
ARCHITECTURE_FIELDS = PARAMETER_SHAPE_FIELDS + ("rope_theta", "rope_scaling", "norm_eps")


def architecture_differences(
    found: ModelConfig | dict, expected: ModelConfig, fields: tuple[str, ...] = ARCHITECTURE_FIELDS
) -> list[tuple[str, object, object]]:
    """(field, found value, expected value) for each of `fields` where two models differ; `found`
    may be a config's dict as stored beside a checkpoint. The one compatibility check."""
    if dataclasses.is_dataclass(found):
        found = dataclasses.asdict(found)
    ours = dataclasses.asdict(expected)
    return [(k, found.get(k), ours[k]) for k in fields if found.get(k) != ours[k]]


def model_preset(name: str, **overrides) -> ModelConfig:
    """The `ModelConfig` of a published size, e.g. `model_preset("llama3_8b")`."""
    if name not in PRESETS:
        close = difflib.get_close_matches(name, PRESETS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"Unknown model preset {name!r}.{hint} Known: {', '.join(PRESETS)}.")
    return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]


# --------------------------------------------------------------------------------------------
# Experiments: what to train, how, on which mesh. `experiments/NAME.py` files build these.


# Logical axis -> mesh axis (or axes), the default of `mesh.rules`. Flax applies the rules in
# order and never uses one mesh axis twice in an array, so in activations [batch, length, embed]
# `embed` falls back to replicated because `batch` already took `fsdp`.
DEFAULT_RULES = (
    ("batch", ("dcn", "data", "fsdp")),  # dcn: across slices; data and fsdp: inside one
    ("length", "context"),  # context parallelism (mesh.context > 1) splits the sequence
    ("embed", "fsdp"),  # parameters: FSDP shards the model dimension
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("norm", None),
)


def _as_rules(rules) -> tuple:
    """Rules as nested tuples (an override or a YAML file gives lists), checked for shape."""
    out = []
    for rule in rules:
        if not isinstance(rule, (tuple, list)) or len(rule) != 2 or not isinstance(rule[0], str):
            raise ValueError(f"mesh.rules: {rule!r} is not a (logical axis, mesh axes) pair.")
        axes = rule[1]
        if isinstance(axes, (tuple, list)):
            axes = tuple(axes)
        elif axes is not None and not isinstance(axes, str):
            raise ValueError(f"mesh.rules: the mesh axes of {rule[0]!r} must be a name, a list or None.")
        out.append((rule[0], axes))
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How a decoder picks tokens: generation, PPO rollouts, rejection sampling and the sample at
    the end of a training run all take one of these (see generate.generate)."""

    max_new_tokens: int = 256
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: no top-k cut
    top_p: float = 1.0  # 1: no nucleus cut

    def __post_init__(self):
        check_ranges(
            "",
            self,
            [
                ("max_new_tokens", non_negative, "at least 0"),
                ("temperature", non_negative, "at least 0"),
                ("top_k", non_negative, "at least 0"),
                ("top_p", lambda x: 0 < x <= 1, "in (0, 1]"),
            ],
        )


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh sizes; -1 (at most one) takes all the devices the others leave in a slice."""

    data: int = 1
    fsdp: int = -1
    # Devices that share each sequence (context parallelism, context_parallel.py): train.seq_len
    # must be a multiple of 2 x context.
    context: int = 1
    tensor: int = 1
    # Data parallelism across slices of a multi-slice pod, over the data-center network (DCN); the
    # other axes stay inside a slice (ICI). 0: as many as the slices the devices span (1 on one
    # slice). On GPUs, dcn > 1 splits the batch across hosts the same way.
    dcn: int = 0
    # Which mesh axes shard each logical axis the model names (see DEFAULT_RULES); an experiment
    # overrides it to shard differently without touching model code.
    rules: Any = DEFAULT_RULES

    def __post_init__(self):
        object.__setattr__(self, "rules", _as_rules(self.rules))


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW with warmup, cosine decay to a floor and an optional final linear anneal to zero."""

    peak_lr: float = 3e-4
    warmup_steps: int = 2000
    # Steps from the start to the end of the cosine (0: the whole run). After it the lr stays at
    # the floor until the anneal.
    decay_steps: int = 0
    final_lr_ratio: float = 0.1  # the cosine's floor, as a fraction of peak_lr
    anneal_steps: int = 0  # Llama 3: linear to zero over the last N steps
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1  # not applied to norm weights
    clip_norm: float = 1.0

    def __post_init__(self):
        check_ranges(
            "optim",
            self,
            [
                ("peak_lr", positive, "positive"),
                ("warmup_steps", non_negative, "at least 0"),
                ("decay_steps", non_negative, "at least 0"),
                ("final_lr_ratio", fraction, "between 0 and 1"),
                ("anneal_steps", non_negative, "at least 0"),
                ("b1", below_one, "in [0, 1)"),
                ("b2", below_one, "in [0, 1)"),
                ("eps", positive, "positive"),
                ("weight_decay", non_negative, "at least 0"),
                ("clip_norm", positive, "positive"),
            ],
        )


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 150
    batch_size: int = 16  # sequences per step, over all devices and microbatches
    seq_len: int = 256
    microbatches: int = 1  # gradient accumulation inside the jitted step
    loss_chunk: int = 512  # positions per chunk of the LM head + loss (bounds fp32 logits)
    # Keep every chunk's fp32 logits for the backward pass instead of computing the head's matmul
    # again there: a third fewer head FLOPs for tokens x vocab x 4 bytes per device (see loss.py).
    keep_logits: bool = False
    log_every: int = 10
    eval_every: int = 50
    eval_batches: int = 4
    seed: int = 0
    sample_tokens: int = 48  # length of the sample printed at the end (0: none)
    sample_prompt: str = "def "
    # A step whose loss or gradient norm is not finite is never applied; then "stop" ends the run
    # (one sentence naming the step), "skip" goes on and ends it after max_skipped in a row.
    on_nonfinite: str = "stop"
    max_skipped: int = 10
    # "a:b": a JAX profiler trace of the steps after step a up to step b, in the workdir
    # (TensorBoard's profile plugin and Perfetto read it); "": none.
    profile_steps: str = ""

    def __post_init__(self):
        check_ranges(
            "train",
            self,
            [
                (name, positive, "at least 1")
                for name in ("steps", "batch_size", "seq_len", "microbatches", "loss_chunk", "log_every")
            ]
            + [
                ("eval_every", positive, "at least 1"),
                ("eval_batches", non_negative, "at least 0"),
                ("seed", non_negative, "at least 0"),
                ("sample_tokens", non_negative, "at least 0"),
                ("max_skipped", positive, "at least 1"),
            ],
        )
        if self.on_nonfinite not in ("stop", "skip"):
            raise ValueError(f"train.on_nonfinite must be 'stop' or 'skip', got {self.on_nonfinite!r}.")
        self.profile_range  # noqa: B018 - validates profile_steps

    @property
    def profile_range(self) -> tuple[int, int] | None:
        """profile_steps "a:b" as (a, b), or None."""
        if not self.profile_steps:
            return None
        first, colon, last = self.profile_steps.partition(":")
        try:
            a, b = int(first), int(last)
        except ValueError:
            a = b = -1
        if not colon or a < 0 or b <= a:
            raise ValueError(
                "train.profile_steps must be 'a:b' with 0 <= a < b (a trace of the steps after a up "
                f"to b), got {self.profile_steps!r}."
            )
        return a, b

    @property
    def sampling(self) -> SamplingConfig:
        """The end-of-run sample: temperature 0.8, top-k 40."""
        return SamplingConfig(max_new_tokens=self.sample_tokens, temperature=0.8, top_k=40)


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """Orbax checkpoints in WORKDIR/checkpoints; `train` resumes from the newest good one."""

    every_steps: int = 50  # 0: only at the end (and on SIGTERM or preemption)
    keep_last: int = 3
    keep_every: int = 0  # also keep every step divisible by this (0: none)
    async_save: bool = True  # the step loop does not wait for the write
    resume: bool = True
    # Resume a checkpoint written with other data settings, the new data from its beginning
    # (otherwise such a resume is refused: the saved position belongs to the old data).
    reset_data: bool = False
    # How long the run waits for a checkpoint write (and, on several hosts, for the others during
    # one) before it ends with one sentence instead of hanging on a stalled filesystem.
    write_timeout_s: float = 1800.0

    def __post_init__(self):
        check_ranges(
            "checkpoint",
            self,
            [
                ("every_steps", non_negative, "at least 0 (0: only at the end)"),
                # keep_last=0 would let the manager delete every checkpoint, the final one included.
                ("keep_last", positive, "at least 1"),
                ("keep_every", non_negative, "at least 0"),
                ("write_timeout_s", positive, "positive"),
            ],
        )


@dataclasses.dataclass(frozen=True)
class Phase:
    """One phase of a run trained in phases (`Experiment.phases`, see phases.py), as Llama 3.1
    extends its context and the 405B ramps its batch. What a phase leaves at 0 or empty is the
    experiment's own setting; the phases run one after the other, each compiled once."""

    name: str = ""
    tokens: float = 0  # the phase's token budget: ceil(tokens / (batch_size x seq_len)) steps
    seq_len: int = 0  # 0: train.seq_len
    batch_size: int = 0  # sequences per step; 0: train.batch_size
    microbatches: int = 0  # 0: train.microbatches
    context: int = 0  # mesh.context, devices per sequence (the -1 axis gives or takes); 0: the mesh's
    checkpoint_every: int = 0  # checkpoint.every_steps inside the phase; 0: the experiment's
    rope_scaling: RopeScaling | None = None  # None: the model's
    # Weights of data.sources in order, e.g. the anneal's shift toward high-quality sources; (): the
    # experiment's.
    mixture: tuple[float, ...] = ()
    keep_logits: bool | None = None  # train.keep_logits inside the phase; None: the experiment's
    # The learning-rate segment: < 0 follows the run's schedule (optim, over all phases); a value
    # goes linearly from the schedule's rate at the phase's start to it at the end (0: an anneal).
    lr_to: float = -1.0
    # At the end of the phase: the parameters of its N newest checkpoints averaged (Polyak) into
    # WORKDIR/averaged/NAME (0: none).
    average_last: int = 0

    def __post_init__(self):
        check_ranges(
            "phase",
            self,
            [
                ("tokens", positive, "positive"),
                ("seq_len", non_negative, "at least 0"),
                ("batch_size", non_negative, "at least 0"),
                ("microbatches", non_negative, "at least 0"),
                ("context", non_negative, "at least 0"),
                ("checkpoint_every", non_negative, "at least 0"),
                ("average_last", lambda x: x == 0 or x >= 2, "0 or at least 2"),
            ],
        )
        if any(w < 0 for w in self.mixture) or (self.mixture and not sum(self.mixture) > 0):
            raise ValueError(f"phase {self.name!r}: mixture weights must be at least 0, not all 0.")


POSTTRAIN_STAGES = ("sft", "rm", "dpo", "ppo", "grpo")


@dataclasses.dataclass(frozen=True)
class PPOConfig:
    """PPO as in Llama 2: each of train.steps iterations samples one response for each of
    train.batch_size prompts with the KV-cache decoder, scores it, and takes one optimizer step per
    minibatch of the rollouts for `epochs` passes. Prompt plus response fit in train.seq_len."""

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    minibatch_size: int = 64  # Llama 2: 512 prompts per iteration, minibatches of 64
    epochs: int = 1  # passes over each iteration's rollouts
    kl_coef: float = 0.01  # Llama 2: 0.01 (7B, 13B), 0.005 (70B)
    clip: float = 0.2
    value_clip: float = 0.2
    gamma: float = 1.0
    lam: float = 0.95
    whiten_scores: bool = True  # Llama 2 whitens the reward model's logits over the batch
    value_lr: float = 0.0  # the value model's peak lr (0: optim.peak_lr)
    eval_prompts: int = 0  # held-out prompts scored greedily at each eval (0: none)

    @property
    def sampling(self) -> SamplingConfig:
        return SamplingConfig(self.max_new_tokens, self.temperature, self.top_k, self.top_p)

    def __post_init__(self):
        for name in ("max_new_tokens", "minibatch_size", "epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"PPOConfig.{name} must be at least 1.")
        check_ranges(
            "posttrain.ppo",
            self,
            [
                ("temperature", non_negative, "at least 0"),
                ("top_k", non_negative, "at least 0"),
                ("top_p", lambda x: 0 < x <= 1, "in (0, 1]"),
                ("kl_coef", non_negative, "at least 0"),
                ("clip", positive, "positive"),
                ("value_clip", positive, "positive"),
                ("gamma", fraction, "between 0 and 1"),
                ("lam", fraction, "between 0 and 1"),
                ("value_lr", non_negative, "at least 0 (0: optim.peak_lr)"),
                ("eval_prompts", non_negative, "at least 0"),
            ],
        )


@dataclasses.dataclass(frozen=True)
class PosttrainConfig:
    """A post-training stage (docs/reference.md, "Post-training"). Paths name a parameters checkpoint
    (`checkpoint.save_params`) or a training workdir (its newest checkpoint)."""

    stage: str = "sft"  # one of POSTTRAIN_STAGES
    reference: str = ""  # DPO/PPO: the frozen reference ("": the starting parameters)
    reward_model: str = ""  # PPO: a reward model (an `rm` run's workdir or export)
    score_fn: str = ""  # PPO: "module:function" scoring (prompt, response) instead
    # PPO: Llama 2's second reward model, for safety (a model or a function, as above): its score
    # where the prompt's record has a true "unsafe" field or sigmoid(safety score) is below
    # safety_threshold, the helpfulness score (reward_model or score_fn) otherwise.
    safety_reward_model: str = ""
    safety_score_fn: str = ""
    safety_threshold: float = 0.15
    # GRPO: responses sampled to each prompt; their scores are normalised within the group.
    group_size: int = 8
    chat_template: str = ""  # "llama2" or "llama3" ("": the tokenizer family's)
    eval_fraction: float = 0.05  # RM/DPO: pairs held out for evaluation when eval_data is None
    use_margin: bool = False  # RM: Llama 2's margin from each pair's "margin" field
    beta: float = 0.1  # DPO (Llama 3: 0.1)
    nll_coef: float = 0.2  # DPO: weight of the chosen response's per-token NLL (Llama 3: 0.2)
    mask_special_tokens: bool = True  # DPO: special/formatting tokens out of the log-ratios
    reference_logprobs: str = "precompute"  # DPO: "precompute" once up front, or "online" each step
    ppo: PPOConfig = PPOConfig()

    def __post_init__(self):
        check_ranges(
            "posttrain",
            self,
            [
                ("beta", positive, "positive"),
                ("nll_coef", non_negative, "at least 0"),
                ("group_size", positive, "at least 1"),
            ],
        )
        if self.stage not in POSTTRAIN_STAGES:
            raise ValueError(
                f"posttrain.stage must be one of {', '.join(POSTTRAIN_STAGES)}, got {self.stage!r}."
            )
        if not 0.0 < self.safety_threshold < 1.0:
            raise ValueError(
                f"posttrain.safety_threshold is a probability in (0, 1), got {self.safety_threshold}."
            )
        if self.safety_reward_model and self.safety_score_fn:
            raise ValueError("Give posttrain.safety_reward_model or posttrain.safety_score_fn, not both.")
        if self.reference_logprobs not in ("precompute", "online"):
            raise ValueError(
                "posttrain.reference_logprobs must be 'precompute' or 'online', "
                f"got {self.reference_logprobs!r}."
            )
        if self.chat_template not in ("", "llama2", "llama3", "hf"):
            raise ValueError(
                f"posttrain.chat_template must be llama2, llama3 or hf (the tokenizer's own), got "
                f"{self.chat_template!r}."
            )
        if not 0 <= self.eval_fraction < 1:
            raise ValueError("posttrain.eval_fraction must be in [0, 1).")


@dataclasses.dataclass(frozen=True)
class RoundsConfig:
    """Llama 3's post-training loop (posttrain/rounds.py): each round trains a reward model on the
    preference data so far, rejection-samples from the previous round's best model, fine-tunes
    (SFT) on the kept samples plus the experiment's own data, and runs DPO on pairs sampled from
    the new SFT model. The experiment's other fields are the steps' common settings; `sft`, `rm`
    and `dpo` are overrides (key=value, as on the command line) for one step only."""

    rounds: int = 3
    prompts: tuple[str, ...] = ()  # JSONL prompts to rejection-sample (and to sample DPO pairs)
    # Preference pairs for the reward model, one file per round: round r trains on files 1..r (the
    # last file serves every later round). (): no reward model; score_fn scores the samples.
    preferences: tuple[str, ...] = ()
    score_fn: str = ""  # "module:function" fn(prompt record, response) -> float: a checker
    eval_prompts: tuple[str, ...] = ()  # held-out prompts: every model is scored on greedy replies
    first_policy: str = ""  # what round 1 samples from ("": init_from)
    k: int = 8  # samples per prompt in rejection sampling (Llama 3: 10-30)
    dpo_k: int = 4  # samples per prompt for DPO pairs (best and worst)
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64
    min_score: float = float("-inf")  # a kept sample must score at least this (a checker: 1.0)
    samples_weight: float = 1.0  # the kept samples' weight beside the experiment's data sources
    sft: tuple[str, ...] = ()
    rm: tuple[str, ...] = ()
    dpo: tuple[str, ...] = ()
    # Model averaging (Llama 3): variants of a step, each a space-separated list of overrides on
    # top of the step's, trained separately and averaged; the average goes on only where its
    # held-out score is at least its best member's (else the best member does). (): one run.
    sft_variants: tuple[str, ...] = ()
    dpo_variants: tuple[str, ...] = ()

    def __post_init__(self):
        for name in ("rounds", "k", "dpo_k", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"rounds.{name} must be at least 1.")
        if self.dpo_k < 2:
            raise ValueError("rounds.dpo_k must be at least 2: a pair is the best and the worst sample.")
        check_ranges(
            "rounds",
            self,
            [
                ("temperature", non_negative, "at least 0"),
                ("top_p", lambda x: 0 < x <= 1, "in (0, 1]"),
                ("samples_weight", positive, "positive"),
            ],
        )
        for name in ("sft_variants", "dpo_variants"):
            if len(getattr(self, name)) == 1:
                raise ValueError(f"rounds.{name} lists one variant; averaging needs at least two (or none).")


@dataclasses.dataclass(frozen=True)
class Experiment:
    """Everything a run needs. The defaults are the `tiny` experiment, runnable on a laptop."""

    name: str = "tiny"
    model: ModelConfig = PRESETS["tiny"]
    optim: OptimConfig = OptimConfig(peak_lr=2e-3, warmup_steps=15, final_lr_ratio=0.1, weight_decay=0.1)
    mesh: MeshConfig = MeshConfig()
    train: TrainConfig = TrainConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    data: DataConfig = STDLIB_TRAIN
    eval_data: DataConfig | None = STDLIB_EVAL  # held-out split, evaluated every train.eval_every
    # The parameters every stage starts from (see init_from.py): a Hugging Face or Meta directory,
    # a llama_jax parameters checkpoint or a training workdir; "": random. The optimizer starts
    # fresh; the tokenizer is the source's unless data.tokenizer_path names one.
    init_from: str = ""
    # Take the architecture from init_from rather than `model` (on the command line: model=from_init);
    # `model` then only says how to compute (dtypes, remat, attention kernel).
    architecture_from_init: bool = False
    # Training in phases (phases.py): each with its own sequence length, batch, token budget, RoPE
    # scaling, data mixture and learning-rate segment; (): one phase of train.steps.
    phases: tuple[Phase, ...] = ()
    # Low-rank adapters (LoRA; QLoRA with lora.quantize_base): rank 0 trains every parameter.
    lora: LoraConfig = LoraConfig()
    # A post-training stage (SFT, reward model, DPO, PPO) and its settings; None: pretraining.
    posttrain: PosttrainConfig | None = None
    # Llama 3's post-training loop (`python -m llama_jax.posttrain.rounds`); None: one stage.
    rounds: RoundsConfig | None = None
    # The stage that trains (a name in the trainer's registry); "": "pretrain", or posttrain.stage.
    stage: str = ""
    # The hardware the recipe was sized for, e.g. "v5p-512"; informational until checked by AOT.
    target: str = "cpu"
    description: str = ""

    def __post_init__(self):
        # An override of one phase's field arrives with the list as plain mappings (see
        # _nested_override); a phase is a Phase again here, and RoPE scaling a RopeScaling.
        def as_phase(item):
            if not isinstance(item, Phase):
                item = dict(item)
                if item.get("rope_scaling") is not None and not isinstance(item["rope_scaling"], RopeScaling):
                    item["rope_scaling"] = RopeScaling(**item["rope_scaling"])
                item["mixture"] = tuple(item.get("mixture") or ())
                item = Phase(**item)
            return item

        object.__setattr__(self, "phases", tuple(as_phase(p) for p in self.phases))
        # The model computes with the adapters the experiment asks for (lora is the one setting).
        lora = self.lora if self.lora.rank else None
        if self.model.lora != lora:
            object.__setattr__(self, "model", dataclasses.replace(self.model, lora=lora))
        if lora is not None:
            if "output" in lora.targets and self.model.tie_embeddings:
                raise ValueError(
                    "lora.targets names output, but this model ties its head to the embeddings; "
                    "adapt the other weights."
                )
            for target, (d_in, d_out) in lora.weight_sides(self.model).items():
                if lora.rank > min(d_in, d_out):
                    raise ValueError(
                        f"lora.rank={lora.rank} is larger than the smaller side of {target} "
                        f"({d_in} x {d_out}); choose at most {min(d_in, d_out)}."
                    )

    def replace(self, **changes) -> "Experiment":
        return dataclasses.replace(self, **changes)

    @property
    def stage_name(self) -> str:
        if self.stage:
            return self.stage
        return "pretrain" if self.posttrain is None else self.posttrain.stage


class ConfigError(ValueError):
    """A bad experiment or override; its message is one sentence fit for the user."""


def _all_keys(cfg, prefix=""):
    for field in dataclasses.fields(cfg):
        value = getattr(cfg, field.name)
        if dataclasses.is_dataclass(value):
            yield from _all_keys(value, prefix + field.name + ".")
        elif isinstance(value, (tuple, list)) and value and dataclasses.is_dataclass(value[0]):
            for i, item in enumerate(value):  # e.g. data.sources.0.weight
                yield from _all_keys(item, f"{prefix}{field.name}.{i}.")
        else:
            yield prefix + field.name


def apply_overrides(exp: Experiment, overrides: list[str]) -> Experiment:
    """`["optim.peak_lr=1e-4", "mesh.tensor=8"]` applied to `exp`, type-checked by OmegaConf."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    if not overrides:
        return exp
    # `model=from_init`: the architecture comes from init_from (a value, not a section).
    overrides = [
        "architecture_from_init=true" if o.replace(" ", "") == "model=from_init" else o for o in overrides
    ]
    keys = list(_all_keys(exp))
    for item in overrides:
        key, sep, _ = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"Override {item!r} is not of the form key=value (e.g. train.steps=100).")
        if key not in keys and not any(k.startswith(key + ".") for k in keys):
            close = difflib.get_close_matches(key, keys, n=1, cutoff=0.5)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"Unknown override key {key!r}.{hint}")
    merged, stages = OmegaConf.structured(exp), []
    for item in overrides:  # one at a time, so an error can name the override at fault
        key, _, text = item.partition("=")
        try:
            value = OmegaConf.from_dotlist([f"value={text}"])["value"]  # YAML-typed, as on a CLI
            if isinstance(value, (int, float)) and isinstance(_current(merged, key), str):
                value = text.strip()  # a text field keeps the text (YAML reads 2:4 as 124)
            merged = OmegaConf.merge(merged, _nested_override(merged, key.split("."), value))
        except OmegaConfBaseException as err:
            raise ConfigError(f"Bad override {item!r}: {str(err).splitlines()[0]}") from None
        stages.append(merged)
    try:
        return OmegaConf.to_object(merged)
    except (TypeError, ValueError, OmegaConfBaseException) as err:
        message = re.sub(r"^Could not create instance of `\w+`: ", "", str(err).splitlines()[0])
        # The first override after which the settings no longer hold is the one to name.
        for item, partial in zip(overrides, stages):
            try:
                OmegaConf.to_object(partial)
            except (TypeError, ValueError, OmegaConfBaseException):
                raise ConfigError(f"Bad override {item!r}: {message}") from None
        raise ConfigError(f"Bad override: {message}") from None


def _current(config, key: str):
    """The value at dotted `key` of an OmegaConf config, or None."""
    from omegaconf import OmegaConf

    try:
        return OmegaConf.select(config, key, default=None)
    except Exception:  # noqa: BLE001 - a key through a list or a value: no current text
        return None


def _nested_override(config, parts: list[str], value):
    """{"a": {"b": value}} for a.b; a merge replaces lists whole, so for data.sources.0.weight
    the override carries the whole list with that one field changed."""
    from omegaconf import OmegaConf

    for i, part in enumerate(parts):
        if part.isdigit():
            items = OmegaConf.to_container(OmegaConf.select(config, ".".join(parts[:i])))
            node = items[int(part)]
            for sub in parts[i + 1 : -1]:
                node = node[sub]
            node[parts[-1]] = value
            parts, value = parts[:i], items
            break
    for part in reversed(parts):
        value = {part: value}
    return value


# Experiment files live in the repository's experiments/ folder; a path to any .py file works too.
EXPERIMENTS_DIR = Path(__file__).resolve().parent.parent / "experiments"


def _defines_experiment(path: Path) -> bool:
    try:
        tree = ast.parse(path.read_text())
    except (OSError, SyntaxError):
        return False
    return any(isinstance(node, ast.FunctionDef) and node.name == "experiment" for node in tree.body)


def list_experiments() -> list[str]:
    """Names of the files in experiments/ that define `experiment()`, plus the built-in `tiny`."""
    names = {"tiny"}
    if EXPERIMENTS_DIR.is_dir():
        names |= {p.stem for p in EXPERIMENTS_DIR.glob("*.py") if _defines_experiment(p)}
    return sorted(names)


def load_experiment(name_or_path: str) -> Experiment:
    """The Experiment returned by `experiment()` in experiments/NAME.py or in a given file."""
    looks_like_path = name_or_path.endswith(".py") or "/" in name_or_path
    path = Path(name_or_path) if looks_like_path else EXPERIMENTS_DIR / f"{name_or_path}.py"
    if not path.is_file():
        if name_or_path == "tiny":
            return Experiment()  # the embedded default, also when experiments/ is not installed
        if looks_like_path:
            problem = "is a directory, not a file" if path.is_dir() else "does not exist"
            raise ConfigError(f"Experiment file {name_or_path} {problem}.")
        close = difflib.get_close_matches(name_or_path, list_experiments(), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(
            f"Unknown experiment {name_or_path!r}.{hint} See `python -m llama_jax.train --help` for the list."
        )
    if path.suffix != ".py":
        raise ConfigError(f"Experiment file {name_or_path} is not a Python file (.py).")
    spec = importlib.util.spec_from_file_location(f"llama_jax_experiment_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        if not hasattr(module, "experiment"):
            raise ConfigError(f"{path} does not define experiment() -> Experiment.")
        exp = module.experiment()
    except ConfigError:
        raise
    except Exception as err:  # noqa: BLE001 - the user's file: report where it failed, in one line
        raise ConfigError(_where_it_failed(path, err)) from None
    if not isinstance(exp, Experiment):
        raise ConfigError(f"experiment() in {path} returned a {type(exp).__name__}, not an Experiment.")
    return exp


def _where_it_failed(path: Path, err: BaseException) -> str:
    """`file:line: Error: message` for an exception raised while loading an experiment file, at the
    deepest line of that file in the traceback (or the syntax error's own line)."""
    import traceback

    line = getattr(err, "lineno", None) if isinstance(err, SyntaxError) else None
    if line is None:
        frames = [f for f in traceback.extract_tb(err.__traceback__) if Path(f.filename) == path]
        line = frames[-1].lineno if frames else None
    message = str(err).splitlines()[0] if str(err) else ""
    where = f"{path}:{line}" if line else str(path)
    return f"{where}: {type(err).__name__}: {message}".rstrip(": ")


def model_config_from_dict(fields: dict) -> ModelConfig:
    """The inverse of `dataclasses.asdict(cfg)`, e.g. for a config stored beside a checkpoint."""
    fields = dict(fields)
    if fields.get("rope_scaling") is not None:
        fields["rope_scaling"] = RopeScaling(**fields["rope_scaling"])
    return ModelConfig(**fields)
