"""Training throughput on one GPU: llama_jax's train step with cuDNN attention and with XLA
attention, and PyTorch (transformers with scaled_dot_product_attention) on the same model, batch
and GPU, in one run. Tokens/s and MFU against the chip's dense bf16 peak.

    python experiments/bench_gpu.py [--models llama3_2_1b llama3_8b:4] [--batch 8] [--seq 2048]
                                    [--steps 10] [--remat full] [--no-torch]
    python experiments/bench_gpu.py --smoke    # a toy size on whatever device there is

`NAME:L` is preset NAME cut to L layers (an 8B-shaped model that fits one GPU with its optimizer).
All runs are bf16 compute with fp32 parameters and AdamW (PyTorch: autocast to bf16, fused AdamW).
The whole default run takes a few minutes on an H100.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_train import batch_of, bench_llama_jax, time_steps  # noqa: E402

from llama_jax.config import Experiment, MeshConfig, OptimConfig, TrainConfig, model_preset  # noqa: E402
from llama_jax.metrics import flops_per_token, peak_flops_per_second  # noqa: E402


@dataclasses.dataclass
class Result:
    model: str
    system: str
    seconds_per_step: float
    tokens: int
    flops: float

    def row(self, peak: float) -> str:
        if self.seconds_per_step != self.seconds_per_step:  # NaN: it did not run
            return f"| {self.model} | {self.system} | - | - | - |"
        tokens_per_s = self.tokens / self.seconds_per_step
        mfu = self.flops / self.seconds_per_step / peak
        return (
            f"| {self.model} | {self.system} | {tokens_per_s:,.0f} | "
            f"{self.seconds_per_step * 1e3:,.1f} | {mfu:.1%} |"
        )


def model_of(spec: str, remat: str, compute_dtype: str):
    name, _, layers = spec.partition(":")
    cfg = model_preset(name, remat=remat, compute_dtype=compute_dtype)
    return cfg.replace(n_layers=int(layers)) if layers else cfg


def bench_torch(exp: Experiment, steps: int) -> float:
    import torch
    import transformers

    device = "cuda" if torch.cuda.is_available() else "cpu"
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
            max_position_embeddings=max(cfg.max_seq_len, exp.train.seq_len),
            rms_norm_eps=cfg.norm_eps,
            rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
            tie_word_embeddings=cfg.tie_embeddings,
            attn_implementation="sdpa",
        )
    ).to(device)
    if cfg.remat != "none":
        model.gradient_checkpointing_enable()  # as llama_jax's remat recomputes the layers
    model.train()
    o = exp.optim
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=o.peak_lr,
        betas=(o.b1, o.b2),
        eps=o.eps,
        weight_decay=o.weight_decay,
        fused=device == "cuda",
    )
    tokens = torch.as_tensor(
        batch_of(np.random.default_rng(0), exp.train.batch_size, exp.train.seq_len, cfg.vocab_size)["tokens"],
        dtype=torch.long,
        device=device,
    )

    def step():
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), o.clip_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()

    step(), step()
    return time_steps(step, steps, repeats=2)


def run_one(args, spec: str, system: str) -> float:
    """Seconds per step of one model under one system, in this process."""
    platform = jax.devices()[0].platform
    compute = "bfloat16" if platform == "gpu" or not args.smoke else "float32"
    model = model_of(spec, args.remat, compute)
    attention = "xla" if system.startswith("PyTorch") else system.split(", ")[1].split()[0]
    exp = Experiment(
        model=model.replace(attention=attention, max_seq_len=max(model.max_seq_len, args.seq)),
        mesh=MeshConfig(1, 1, 1),
        optim=OptimConfig(peak_lr=1e-4, warmup_steps=10),
        train=TrainConfig(batch_size=args.batch, seq_len=args.seq),
    )
    return bench_torch(exp, args.steps) if system.startswith("PyTorch") else bench_llama_jax(exp, args.steps)


def measure_apart(argv: list[str], spec: str, system: str, preallocate: str | None) -> float:
    """run_one in a process of its own, so that each run has the whole device's memory (JAX and
    PyTorch each keep what they allocated); NaN, with the reason printed, if it fails."""
    command = [sys.executable, os.path.abspath(__file__), *argv, "--one", spec, system]
    env = {k: v for k, v in os.environ.items() if k != "XLA_PYTHON_CLIENT_PREALLOCATE"}
    if preallocate is not None:
        env["XLA_PYTHON_CLIENT_PREALLOCATE"] = preallocate
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    for line in reversed(done.stdout.splitlines()):
        if line.startswith("{"):
            return float(json.loads(line)["seconds_per_step"])
    reason = (done.stderr.strip().splitlines() or ["no output"])[-1][:200]
    print(f"  {spec}, {system}: failed ({reason})", flush=True)
    return float("nan")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["llama3_2_1b", "llama3_8b:4"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--remat", default="full", choices=("none", "full", "dots", "dots_no_batch"))
    parser.add_argument("--no-torch", action="store_true", help="leave out the PyTorch runs")
    parser.add_argument("--smoke", action="store_true", help="a toy model on any device: proves it runs")
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "SYSTEM"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.smoke:
        args.models, args.batch, args.seq, args.steps = ["tiny:2"], 2, 128, 2
    if args.one:
        print(json.dumps({"seconds_per_step": run_one(args, *args.one)}))
        return 0

    # This process only looks at the device: the runs, each in its own process, get its memory.
    preallocate = os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE")
    os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    platform = jax.devices()[0].platform
    compute = "bfloat16" if platform == "gpu" or not args.smoke else "float32"
    attentions = ["cudnn", "xla"] if platform == "gpu" else ["xla"]
    peak, source = peak_flops_per_second()
    if platform != "cpu":  # one device runs (a CPU's measured peak is the whole host already)
        peak /= len(jax.devices())
    print(
        f"{jax.devices()[0].device_kind} ({platform}); peak {peak / 1e12:,.1f} TFLOP/s ({source}); "
        f"batch {args.batch} x {args.seq}, remat {args.remat}, {args.steps} timed steps (best of 3 for llama_jax, 2 for PyTorch)",
        flush=True,
    )
    results = []
    for spec in args.models:
        model = model_of(spec, args.remat, compute)
        tokens = args.batch * args.seq
        flops = flops_per_token(model, args.seq) * tokens
        systems = [f"llama_jax, {attention} attention" for attention in attentions]
        for system in systems + ([] if args.no_torch else ["PyTorch, sdpa"]):
            started = time.perf_counter()
            seconds = measure_apart(argv or sys.argv[1:], spec, system, preallocate)
            results.append(Result(spec, system, seconds, tokens, flops))
            print(f"  {results[-1].row(peak)}  ({time.perf_counter() - started:.0f} s)", flush=True)

    print("\n| model | system | tokens/s | ms/step | MFU |\n|---|---|---|---|---|")
    print("\n".join(result.row(peak) for result in results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
