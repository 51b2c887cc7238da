"""The optimizer of the Llama recipes: AdamW, global-norm clipping, and the learning-rate schedule.

Schedule (docs/reference.md, "Recipes"): linear warmup to `peak_lr`; cosine decay to `final_lr_ratio * peak_lr`
at `decay_steps` (LLaMA 1/2: 10%; Llama 3: 1%); the floor until the last `anneal_steps`, which go
linearly to zero (Llama 3's annealing).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from llama_jax.config import OptimConfig


def learning_rate_schedule(cfg: OptimConfig, total_steps: int, segments=()) -> optax.Schedule:
    """`segments`: (start, end, rate) lines that replace the schedule inside [start, end), from its
    value at `start` to `rate` after the last step (training in phases, see phases.py)."""
    decay_steps = cfg.decay_steps or total_steps
    floor = cfg.peak_lr * cfg.final_lr_ratio
    anneal_start = total_steps - cfg.anneal_steps

    def warmup_cosine(step):
        warmup = cfg.peak_lr * (step + 1) / max(cfg.warmup_steps, 1)
        progress = jnp.clip((step - cfg.warmup_steps) / max(decay_steps - cfg.warmup_steps, 1), 0, 1)
        cosine = floor + (cfg.peak_lr - floor) * 0.5 * (1 + jnp.cos(jnp.pi * progress))
        return jnp.where(step < cfg.warmup_steps, warmup, cosine)

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        lr = warmup_cosine(step)
        if cfg.anneal_steps:
            # Linear from wherever the schedule stands at anneal_start down to zero at the end.
            fraction = jnp.clip((total_steps - step) / cfg.anneal_steps, 0, 1)
            lr = jnp.where(step >= anneal_start, warmup_cosine(anneal_start) * fraction, lr)
        return lr

    def segmented(step, count=len(segments)):
        # Each line starts where the schedule, with the lines before it, stands at its start.
        lr = schedule(step) if count == 0 else segmented(step, count - 1)
        if count:
            start, end, rate = segments[count - 1]
            begin = segmented(start, count - 1)
            line = rate + (begin - rate) * (end - jnp.asarray(step, jnp.float32)) / (end - start)
            lr = jnp.where((step >= start) & (step < end), line, lr)
        return lr

    return segmented if segments else schedule


def decay_mask(params):
    """Weight decay on matrices and embeddings, not on norm weights."""

    def keep(path, _):
        return not any("norm" in str(getattr(key, "key", key)) for key in path)

    return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(
    cfg: OptimConfig, total_steps: int, segments=()
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    schedule = learning_rate_schedule(cfg, total_steps, segments)
    optimizer = optax.chain(
        optax.clip_by_global_norm(cfg.clip_norm),
        optax.adamw(
            schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=decay_mask
        ),
    )
    return optimizer, schedule
