"""Training throughput on this machine: tokens/s and MFU of llama_jax's train step for a fixed
small model, and with --vs-hf the same model, batch and optimizer in Hugging Face transformers
(PyTorch) side by side in the same run.

    python experiments/bench_train.py [--vs-hf] [--keep-logits] [--steps 10] [--batch 8] [--seq 256]

--keep-logits also times the step with train.keep_logits (the LM head's logits kept for the
backward pass instead of computed again), in the same run.

MFU is against the measured fp32 matmul peak of this CPU (`llama_jax.metrics.measured_cpu_peak`).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time

import jax
import numpy as np

from llama_jax.config import Experiment, MeshConfig, OptimConfig, TrainConfig, model_preset
from llama_jax.metrics import flops_per_token, measured_cpu_peak
from llama_jax.optim import make_optimizer
from llama_jax.sharding import activation_sharding, make_mesh
from llama_jax.stages.pretrain import Pretrain
from llama_jax.steps import global_batch


def batch_of(rng, batch, seq, vocab):
    return {
        "tokens": rng.integers(0, vocab, (batch, seq)).astype(np.int32),
        "positions": np.tile(np.arange(seq, dtype=np.int32), (batch, 1)),
        "segment_ids": np.ones((batch, seq), np.int32),
        "loss_mask": np.ones((batch, seq), np.float32),
    }


def time_steps(step, steps: int, repeats: int = 3) -> float:
    """Best of `repeats` timings of `steps` calls, in seconds per step."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            step()
        best = min(best, (time.perf_counter() - start) / steps)
    return best


def bench_llama_jax(exp: Experiment, steps: int) -> float:
    mesh = make_mesh(exp.mesh, jax.devices()[:1])
    optimizer, schedule = make_optimizer(exp.optim, 1000)
    compiled = Pretrain().compile(exp, optimizer, schedule, mesh)
    state = Pretrain().create_state(exp, optimizer, mesh, jax.random.key(0))
    batch = global_batch(
        batch_of(np.random.default_rng(0), exp.train.batch_size, exp.train.seq_len, exp.model.vocab_size),
        compiled.batch_sharding,
    )
    holder = {"state": state}

    def step():
        holder["state"], metrics = compiled.train_step(holder["state"], batch)
        jax.block_until_ready(metrics["loss"])

    with activation_sharding(mesh):
        step(), step()  # compile and warm up
        return time_steps(step, steps)


def bench_transformers(exp: Experiment, steps: int) -> float:
    import torch
    import transformers

    torch.set_num_threads(os.cpu_count())
    cfg = exp.model
    model = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            hidden_size=cfg.dim,
            intermediate_size=cfg.ffn_dim,
            num_hidden_layers=cfg.n_layers,
            num_attention_heads=cfg.n_heads,
            num_key_value_heads=cfg.n_kv_heads,
            head_dim=cfg.head_dim,
            vocab_size=cfg.vocab_size,
            max_position_embeddings=cfg.max_seq_len,
            rms_norm_eps=cfg.norm_eps,
            rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
            tie_word_embeddings=cfg.tie_embeddings,
            attn_implementation="sdpa",
        )
    )
    model.train()
    o = exp.optim
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=o.peak_lr, betas=(o.b1, o.b2), eps=o.eps, weight_decay=o.weight_decay
    )
    tokens = torch.as_tensor(
        batch_of(np.random.default_rng(0), exp.train.batch_size, exp.train.seq_len, cfg.vocab_size)["tokens"],
        dtype=torch.long,
    )

    def step():
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), o.clip_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step(), step()
    return time_steps(step, steps)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vs-hf", action="store_true", help="also run transformers and print the ratio")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--keep-logits", action="store_true", help="also time train.keep_logits=true")
    args = parser.parse_args()

    exp = Experiment(
        model=model_preset(args.preset, compute_dtype="float32"),
        mesh=MeshConfig(1, 1, 1),
        optim=OptimConfig(peak_lr=1e-4, warmup_steps=10),
        train=TrainConfig(batch_size=args.batch, seq_len=args.seq),
    )
    tokens = args.batch * args.seq
    flops = flops_per_token(exp.model, args.seq) * tokens
    peak = measured_cpu_peak()
    print(
        f"model {args.preset}: batch {args.batch} x {args.seq} tokens, {flops / 1e9:.1f} GFLOP/step; "
        f"measured fp32 matmul peak {peak / 1e9:.1f} GFLOP/s on {os.cpu_count()} cores"
    )
    ours = bench_llama_jax(exp, args.steps)
    print(
        f"llama_jax     {tokens / ours:10,.0f} tokens/s  {ours * 1e3:8.1f} ms/step  "
        f"MFU {flops / ours / peak:6.1%}"
    )
    if args.keep_logits:
        kept = bench_llama_jax(
            exp.replace(train=dataclasses.replace(exp.train, keep_logits=True)), args.steps
        )
        print(
            f"  keep_logits {tokens / kept:10,.0f} tokens/s  {kept * 1e3:8.1f} ms/step  "
            f"MFU {flops / kept / peak:6.1%}  ({ours / kept:.2f}x the default)"
        )
    if args.vs_hf:
        theirs = bench_transformers(exp, args.steps)
        print(
            f"transformers  {tokens / theirs:10,.0f} tokens/s  {theirs * 1e3:8.1f} ms/step  "
            f"MFU {flops / theirs / peak:6.1%}"
        )
        print(f"ratio llama_jax / transformers: {theirs / ours:.2f}x")


if __name__ == "__main__":
    main()
