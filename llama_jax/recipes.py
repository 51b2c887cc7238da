"""The published pretraining and post-training recipes (docs/reference.md, "Recipes") as Experiment builders.

`experiments/llama2_70b.py` and its siblings call `pretraining(...)` with the paper's numbers; the
arithmetic from tokens to steps and sequences lives here once.
"""

from __future__ import annotations

import dataclasses
import math

from llama_jax import phases as phases_lib
from llama_jax.config import (
    DEFAULT_RULES,
    CheckpointConfig,
    Experiment,
    MeshConfig,
    OptimConfig,
    Phase,
    PosttrainConfig,
    TrainConfig,
    model_preset,
)


def pretraining(
    preset: str,
    *,
    seq_len: int,
    batch_tokens: int,
    total_tokens: float,
    peak_lr: float,
    warmup_steps: int,
    final_lr_ratio: float,
    eps: float = 1e-8,
    decay_steps: int = 0,
    anneal_tokens: float = 0,
    target: str,
    mesh: MeshConfig = MeshConfig(data=1, fsdp=-1, tensor=1),
    remat: str = "full",
    microbatches: int = 1,
    description: str = "",
) -> Experiment:
    """A pretraining Experiment from a paper's recipe: AdamW (0.9, 0.95), weight decay 0.1,
    clipping 1.0, warmup then cosine to `final_lr_ratio`, and optionally Llama 3's anneal."""
    batch_size = batch_tokens // seq_len
    steps = math.ceil(total_tokens / (batch_size * seq_len))
    return Experiment(
        name=preset,
        model=model_preset(preset, remat=remat),
        optim=OptimConfig(
            peak_lr=peak_lr,
            warmup_steps=warmup_steps,
            decay_steps=decay_steps,
            final_lr_ratio=final_lr_ratio,
            anneal_steps=math.ceil(anneal_tokens / (batch_size * seq_len)),
            b1=0.9,
            b2=0.95,
            eps=eps,
            weight_decay=0.1,
            clip_norm=1.0,
        ),
        mesh=mesh,
        train=TrainConfig(
            steps=steps,
            batch_size=batch_size,
            seq_len=seq_len,
            microbatches=microbatches,
            loss_chunk=1024,
            # Every recipe's logits fit its slice (`python -m llama_jax.aot --recipes` checks it).
            keep_logits=True,
            log_every=10,
            eval_every=1000,
            eval_batches=20,
            sample_tokens=0,
        ),
        checkpoint=CheckpointConfig(every_steps=1000, keep_last=3, keep_every=10_000),
        target=target,
        description=description,
    )


# LLaMA 1 (2302.13971): 4M-token batches of 2048, 2000 warmup steps, cosine to 10%.
def llama1(preset: str, peak_lr: float, total_tokens: float, target: str) -> Experiment:
    return pretraining(
        preset,
        seq_len=2048,
        batch_tokens=4 * 2**20,
        total_tokens=total_tokens,
        peak_lr=peak_lr,
        warmup_steps=2000,
        final_lr_ratio=0.1,
        target=target,
        description=f"LLaMA 1 recipe: {total_tokens / 1e12:.1f}T tokens.",
    )


# Llama 2 (2307.09288): as LLaMA 1 with eps 1e-5, 4096 context, 2T tokens.
def llama2(preset: str, peak_lr: float, target: str) -> Experiment:
    return pretraining(
        preset,
        seq_len=4096,
        batch_tokens=4 * 2**20,
        total_tokens=2.0e12,
        peak_lr=peak_lr,
        warmup_steps=2000,
        final_lr_ratio=0.1,
        eps=1e-5,
        target=target,
        description="Llama 2 recipe: 2.0T tokens.",
    )


# Llama 3 (2407.21783): 8K context, ~15.6T tokens, cosine to 1% then a linear anneal to zero over
# the last 40M tokens. The paper gives 405B's batch (ramped 4M -> 8M -> 16M tokens; we use the
# final 16M), its 8000 warmup steps and its 1.2M-step cosine; for 8B and 70B it gives only the
# peak lr, so they take Llama 2's 4M-token batch and 2000 warmup steps and decay over the run.
def llama3(
    preset: str,
    peak_lr: float,
    target: str,
    mesh: MeshConfig = MeshConfig(),
    large: bool = False,
    microbatches: int = 1,
) -> Experiment:
    return pretraining(
        preset,
        seq_len=8192,
        batch_tokens=(16 if large else 4) * 2**20,
        total_tokens=15.6e12,
        peak_lr=peak_lr,
        warmup_steps=8000 if large else 2000,
        decay_steps=1_200_000 if large else 0,
        final_lr_ratio=0.01,
        anneal_tokens=40e6,
        target=target,
        mesh=mesh,
        microbatches=microbatches,
        description="Llama 3 recipe: 15.6T tokens at 8K context, annealed.",
    )


# Llama 3.1 (2407.21783, sections 3.4.2-3.4.3; docs/reference.md, "Training in phases"): the
# Llama 3 pretraining at 8K, then the context grown to 128K in six stages over ~800B tokens, then
# the anneal: the last 40M tokens at 128K with the learning rate to zero and the final model an
# average of its checkpoints. 405B also ramps its batch: 4M tokens at 4,096, 8M at 8,192 after
# 252M tokens, 16M after 2.87T. The stage lengths are a project choice (the paper gives six
# stages and their total only).
LONG_CONTEXT_STAGES = (16384, 32768, 49152, 65536, 98304, 131072)
LONG_CONTEXT_TOKENS = 800e9
ANNEAL_TOKENS = 40e6
TOTAL_TOKENS = 15.6e12
# Under context parallelism the parameters shard over the context axis too (FSDP over the devices
# that share a sequence), so a 128K phase keeps the parameters' memory of the 8K one.
LONG_CONTEXT_RULES = tuple(
    (name, ("fsdp", "context")) if name == "embed" else (name, axes) for name, axes in DEFAULT_RULES
)


def llama3_1(
    preset: str,
    peak_lr: float,
    target: str,
    *,
    long_context: int,
    mesh: MeshConfig = MeshConfig(),
    large: bool = False,
    microbatches: int = 1,
    long_microbatches: int = 1,
) -> Experiment:
    """The Llama 3 recipe at 8K trained on in phases to 128K. The long phases split each sequence
    over mesh.context = `long_context` devices and their batch into `long_microbatches`; their
    batch is the multiple of the rows the mesh takes nearest to the 8K phase's tokens."""
    base = llama3(preset, peak_lr, target, mesh=mesh, large=large, microbatches=microbatches)
    batch_tokens = base.train.batch_size * base.train.seq_len
    chips = int(target.split("-")[1]) // (2 if target.startswith(("v4", "v5p")) else 1)
    rows = chips // (long_context * mesh.tensor * mesh.data) * mesh.data * long_microbatches
    ramp: list[Phase] = []
    if large:
        ramp = [
            Phase(name="ramp-4M", tokens=252e6, seq_len=4096, batch_size=4 * 2**20 // 4096, microbatches=8),
            Phase(name="ramp-8M", tokens=2.87e12 - 252e6, batch_size=8 * 2**20 // 8192, microbatches=16),
        ]

    def long(name: str, length: int, tokens: float, **more) -> Phase:
        return Phase(
            name=name,
            tokens=tokens,
            seq_len=length,
            batch_size=max(rows, round(batch_tokens / length / rows) * rows),
            microbatches=long_microbatches,
            context=long_context,
            # At 128K the logits do not fit beside the rest (`python -m llama_jax.aot --phase N`).
            keep_logits=False,
            **more,
        )

    anneal = long("anneal", LONG_CONTEXT_STAGES[-1], ANNEAL_TOKENS, lr_to=0.0, average_last=3)
    anneal_steps = phases_lib.steps(base, anneal)
    stages = [
        *ramp,
        Phase(
            name="pretrain",
            tokens=TOTAL_TOKENS - sum(p.tokens for p in ramp) - LONG_CONTEXT_TOKENS - ANNEAL_TOKENS,
        ),
        *[
            long(f"context-{length // 1024}K", length, LONG_CONTEXT_TOKENS / len(LONG_CONTEXT_STAGES))
            for length in LONG_CONTEXT_STAGES
        ],
        dataclasses.replace(anneal, checkpoint_every=math.ceil(anneal_steps / 3)),
    ]
    exp = base.replace(
        phases=tuple(stages),
        optim=dataclasses.replace(base.optim, anneal_steps=0),  # the anneal is the last phase
        mesh=dataclasses.replace(base.mesh, rules=LONG_CONTEXT_RULES),
        description="Llama 3.1 recipe: 15.6T tokens at 8K"
        + (" after a 4M -> 8M -> 16M-token batch ramp" if large else "")
        + ", six stages to 128K over 800B tokens, a 40M-token anneal at 128K, checkpoints averaged.",
    )
    return exp.replace(train=dataclasses.replace(exp.train, steps=phases_lib.total_steps(exp)))


# --- post-training (docs/reference.md, "Post-training") ----------------------------------------------


def posttraining(
    preset: str,
    stage: str,
    *,
    data_path: str,
    peak_lr: float,
    steps: int,
    batch_size: int,
    seq_len: int,
    warmup_steps: int,
    target: str,
    posttrain: PosttrainConfig,
    init_from: str = "",
    tokenizer_path: str = "",
    eval_path: str | None = None,
    final_lr_ratio: float = 0.1,
    mesh: MeshConfig = MeshConfig(),
    remat: str = "full",
    microbatches: int = 1,
    name: str = "",
    description: str = "",
) -> Experiment:
    """A post-training Experiment: AdamW (0.9, 0.95), weight decay 0.1, clipping 1.0, warmup then
    cosine to `final_lr_ratio`. `data_path` holds chats (sft), preference pairs (rm, dpo) or
    prompts (ppo) as JSONL; `batch_size` counts sequences (sft), pairs (rm, dpo) or prompts (ppo).
    Paths are placeholders to override on the command line."""
    from llama_jax.data.config import DataConfig, SourceConfig, sft_source

    def source(path):
        return sft_source(path) if stage == "sft" else SourceConfig(path, kind="jsonl", field="prompt")

    return Experiment(
        name=name or f"{preset}_{stage}",
        model=model_preset(preset, remat=remat),
        optim=OptimConfig(
            peak_lr=peak_lr,
            warmup_steps=warmup_steps,
            final_lr_ratio=final_lr_ratio,
            b1=0.9,
            b2=0.95,
            eps=1e-8,
            weight_decay=0.1,
            clip_norm=1.0,
        ),
        mesh=mesh,
        train=TrainConfig(
            steps=steps,
            batch_size=batch_size,
            seq_len=seq_len,
            microbatches=microbatches,
            loss_chunk=1024,
            log_every=10,
            eval_every=200,
            eval_batches=20,
            sample_tokens=0,
        ),
        checkpoint=CheckpointConfig(every_steps=500, keep_last=2),
        data=DataConfig(sources=(source(data_path),), tokenizer_path=tokenizer_path),
        eval_data=None
        if eval_path is None
        else DataConfig(sources=(source(eval_path),), tokenizer_path=tokenizer_path, shuffle=False),
        posttrain=posttrain,
        init_from=init_from,
        target=target,
        description=description,
    )


def tiny_posttraining(
    stage: str, *, peak_lr: float, steps: int, posttrain: PosttrainConfig, init_from: str = ""
) -> Experiment:
    """A post-training stage on the `tiny` model for a CPU, for tests and demonstrations: 16
    sequences of 128 tokens, evaluation every 50 steps, a checkpoint at the end only; its data is
    data/tiny_STAGE.jsonl until overridden."""
    exp = posttraining(
        "tiny",
        stage,
        data_path=f"data/tiny_{stage}.jsonl",
        peak_lr=peak_lr,
        steps=steps,
        batch_size=16,
        seq_len=128,
        warmup_steps=10,
        target="cpu",
        remat="none",
        posttrain=posttrain,
        init_from=init_from,
    )
    return exp.replace(
        train=dataclasses.replace(exp.train, eval_every=50, eval_batches=4),
        checkpoint=dataclasses.replace(exp.checkpoint, every_steps=0),
    )
