"""Training throughput on this machine: tokens/s and MFU of llama_jax's train step for a fixed
small model, and with --vs-hf the same model, batch and optimizer in Hugging Face transformers
(PyTorch) side by side in the same run.

    python experiments/bench_train.py [--vs-hf] [--keep-logits] [--cpu-options] [--steps 10]
                                      [--batch 8] [--seq 256]

--keep-logits also times the step with train.keep_logits (the LM head's logits kept for the
backward pass instead of computed again), in the same run.

--cpu-options times the same step, in one process and in interleaved rounds, compiled with each of
XLA:CPU's runtime, fusion and library options in CPU_OPTIONS (YNNPACK, XNNPACK, oneDNN, fast math,
vector width, scheduling), with the layers' loop scanned, unrolled or unstacked, and with causal
attention in other query blocks than `attention.causal_block_starts` gives (one unsplit matrix,
blocks of 16 or 32 queries), and prints each one's speed against the experiment as configured.

--gemms times each matrix product of the step's shapes (tokens x dim x ffn, the LM head, their
transposes) in JAX and in PyTorch on this CPU, to tell the matmuls from the rest of the step.

MFU is against the measured fp32 matmul peak of this CPU (`llama_jax.metrics.measured_cpu_peak`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import time

import jax
import numpy as np

from llama_jax import attention
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


def llama_jax_step(exp: Experiment, compiler_options: dict | None = None):
    """A function that runs one training step of `exp` on one device and waits for it, compiled
    (with `compiler_options`, XLA debug options by name) and warmed up."""
    mesh = make_mesh(exp.mesh, jax.devices()[:1])
    optimizer, schedule = make_optimizer(exp.optim, 1000)
    compiled = Pretrain().compile(exp, optimizer, schedule, mesh)
    state = Pretrain().create_state(exp, optimizer, mesh, jax.random.key(0))
    batch = global_batch(
        batch_of(np.random.default_rng(0), exp.train.batch_size, exp.train.seq_len, exp.model.vocab_size),
        compiled.batch_sharding,
    )
    with activation_sharding(mesh):
        train_step = compiled.train_step.lower(state, batch).compile(compiler_options)
    holder = {"state": state}

    def step():
        holder["state"], metrics = train_step(holder["state"], batch)
        jax.block_until_ready(metrics["loss"])

    step(), step()  # warm up
    return step


def bench_llama_jax(exp: Experiment, steps: int) -> float:
    return time_steps(llama_jax_step(exp), steps)


_FUSION = "LIBRARY_FUSION_TYPE_"
# XLA:CPU options worth trying on a training step (names from jaxlib's DebugOptions; the defaults
# already send dots to YNNPACK and use the concurrency-optimized scheduler).
CPU_OPTIONS = {
    "YNNPACK also for elementwise ops": {
        "xla_cpu_experimental_ynn_fusion_type": f"{_FUSION}DOT,{_FUSION}ELTWISE"
    },
    "YNNPACK for dots, elementwise ops, reductions": {
        "xla_cpu_experimental_ynn_fusion_type": f"{_FUSION}DOT,{_FUSION}ELTWISE,{_FUSION}REDUCE"
    },
    "XNNPACK fusions of dots": {"xla_cpu_experimental_xnn_fusion_type": f"{_FUSION}DOT"},
    "XNNPACK fusions of dots and elementwise ops": {
        "xla_cpu_experimental_xnn_fusion_type": f"{_FUSION}DOT,{_FUSION}ELTWISE"
    },
    "XNNPACK greedy graph fusion": {
        "xla_cpu_experimental_xnn_graph_fusion_mode": "XNN_GRAPH_FUSION_MODE_GREEDY"
    },
    "oneDNN": {"xla_cpu_use_onednn": True},
    "oneDNN custom calls": {"xla_cpu_use_onednn": True, "xla_cpu_experimental_onednn_custom_call": True},
    "fast math": {"xla_cpu_enable_fast_math": True},
    "128-bit vectors": {"xla_cpu_prefer_vector_width": 128},
    "legacy loop emitters": {"xla_cpu_use_fusion_emitters": False},
    "default scheduler": {"xla_cpu_enable_concurrency_optimized_scheduler": False},
}


@contextlib.contextmanager
def query_blocks(size: int | None):
    """Causal self-attention traced inside is split into blocks of `size` queries (None: one
    unsplit matrix) instead of the library's choice."""
    chosen = attention.causal_block_starts
    attention.causal_block_starts = lambda length: list(range(0, length, size or length))
    try:
        yield
    finally:
        attention.causal_block_starts = chosen


def sweep_cpu_options(exp: Experiment, steps: int, rounds: int = 4) -> None:
    """Print the step's speed under each of CPU_OPTIONS and each layer layout, against `exp` as
    configured; all compiled first, then timed round-robin so that load on the machine hits
    every variant alike."""
    m = exp.model
    layouts = {
        "layers scanned, loop not unrolled": m.replace(scan_layers=True, scan_unroll=1),
        "layers scanned, loop unrolled": m.replace(scan_layers=True, scan_unroll=m.n_layers),
        "layers unstacked": m.replace(scan_layers=False),
    }
    variants = {"as configured": llama_jax_step(exp)}
    for name, model in layouts.items():
        variants[name] = llama_jax_step(exp.replace(model=model))
    for size in (None, 32, 16):
        with query_blocks(size):
            variants[f"attention in blocks of {size} queries" if size else "attention unsplit"] = (
                llama_jax_step(exp)
            )
    for name, options in CPU_OPTIONS.items():
        try:
            variants[name] = llama_jax_step(exp, options)
        except Exception as error:  # an option this jaxlib does not have
            print(f"{name}: not available ({str(error).splitlines()[0]})")
    best = dict.fromkeys(variants, float("inf"))
    for _ in range(rounds):
        for name, step in variants.items():
            best[name] = min(best[name], time_steps(step, steps, repeats=1))
    tokens = exp.train.batch_size * exp.train.seq_len
    print(f"{'variant':48s} {'tokens/s':>9s} {'ms/step':>8s}  vs as configured")
    for name, seconds in best.items():
        print(
            f"{name:48s} {tokens / seconds:9,.0f} {seconds * 1e3:8.1f}  "
            f"{best['as configured'] / seconds:.3f}x"
        )


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


def gemm_shapes(exp: Experiment) -> list[tuple[int, int, int]]:
    """(m, k, n) of the step's 2-D products: the projections and the head, forward and backward."""
    cfg, tokens = exp.model, exp.train.batch_size * exp.train.seq_len
    shapes = []
    for k, n in {(cfg.dim, cfg.ffn_dim), (cfg.dim, cfg.n_heads * cfg.head_dim), (cfg.dim, cfg.vocab_size)}:
        shapes += [(tokens, k, n), (tokens, n, k), (k, tokens, n)]  # forward, input grad, weight grad
    return sorted(set(shapes))


def bench_gemms(exp: Experiment, steps: int) -> None:
    import torch

    torch.set_num_threads(os.cpu_count())
    rng = np.random.default_rng(0)
    matmul = jax.jit(lambda a, b: a @ b)
    print(f"{'m x k x n':>20s} {'JAX GFLOP/s':>12s} {'PyTorch GFLOP/s':>16s}  JAX / PyTorch")
    for m, k, n in gemm_shapes(exp):
        a, b = rng.standard_normal((m, k), np.float32), rng.standard_normal((k, n), np.float32)
        ja, jb = jax.device_put(a), jax.device_put(b)
        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        ours = time_steps(lambda: matmul(ja, jb).block_until_ready(), steps)
        theirs = time_steps(lambda: ta @ tb, steps)
        flops = 2 * m * k * n
        print(
            f"{f'{m} x {k} x {n}':>20s} {flops / ours / 1e9:12.1f} {flops / theirs / 1e9:16.1f}  "
            f"{theirs / ours:.2f}x"
        )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vs-hf", action="store_true", help="also run transformers and print the ratio")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--keep-logits", action="store_true", help="also time train.keep_logits=true")
    parser.add_argument(
        "--cpu-options", action="store_true", help="compare XLA:CPU's options and the layer layouts"
    )
    parser.add_argument("--gemms", action="store_true", help="time the step's matmuls in JAX and PyTorch")
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
    if args.cpu_options:
        sweep_cpu_options(exp, args.steps)
        return
    if args.gemms:
        bench_gemms(exp, args.steps * 4)
        return
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
