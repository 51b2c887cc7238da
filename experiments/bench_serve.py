"""Serving throughput: the OpenAI-compatible server with N concurrent streaming clients (N = 1, 4,
16) against the same requests served one at a time by `generate`, side by side in one run.

    python experiments/bench_serve.py [--ckpt DIR --tokenizer F] [--requests 16] [--max-tokens 128]
                                      [--prompt 32] [--clients 1,4,16] [--slots 16]

Without --ckpt a random model (8 layers, dim 1024, 94M parameters; Llama 3's tokenizer format)
is written to a temporary folder. The server runs as its own process on 127.0.0.1; every request streams exactly
--max-tokens tokens (`ignore_eos`), greedy, so every row does the same work. Printed per row:
requests/s, output tokens/s, time to first token and inter-token latency (median and p99, from
the clients' clocks), and the output tokens/s as a multiple of the faster one-at-a-time
`generate` (as loaded, or with the layers unrolled as the server runs them).
Compilation is excluded: the server compiles before it listens, `generate` is called once first.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_model(root: Path, max_len: int):
    import jax

    from llama_jax.checkpoint import save_params
    from llama_jax.config import ModelConfig
    from llama_jax.data.synthetic import write_tiktoken_model
    from llama_jax.model import init_params

    cfg = ModelConfig(
        dim=1024,
        n_layers=8,
        n_heads=16,
        n_kv_heads=8,
        head_dim=64,
        ffn_dim=2816,
        vocab_size=556,
        max_seq_len=max_len,
    )
    save_params(root / "ckpt", init_params(cfg, jax.random.key(0)), cfg)
    return root / "ckpt", write_tiktoken_model(str(root / "tok"))


def start_server(ckpt, tokenizer, slots: int, max_len: int, log_path: Path):
    import httpx

    port = _free_port()
    command = [sys.executable, "-m", "llama_jax.serve", "--ckpt", str(ckpt), "--tokenizer", str(tokenizer)]
    command += ["--port", str(port), "--slots", str(slots), "--queue", "1024", "--max-len", str(max_len)]
    command += ["--name", "bench"]
    log = open(log_path, "w")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    while True:
        if process.poll() is not None:
            sys.exit(f"The server stopped; see {log_path}.")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return process, url
        except httpx.TransportError:
            time.sleep(0.5)


def stream_one(url: str, prompt: list[int], max_tokens: int):
    """(time to first token, gaps between tokens, tokens) of one streamed completion."""
    import httpx

    body = {"model": "bench", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    body.update(stream=True, ignore_eos=True)
    start = time.perf_counter()
    stamps, tokens = [], 0
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=600) as response:
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"] and chunk["choices"][0]["text"]:
                stamps.append(time.perf_counter())
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return stamps[0] - start, np.diff(stamps).tolist(), tokens


def run_clients(url, prompts, max_tokens, clients: int):
    """Each of `clients` threads sends its share of the prompts one after another."""
    shares = [prompts[i::clients] for i in range(clients)]

    def client(share):
        return [stream_one(url, p, max_tokens) for p in share]

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        results = [r for rs in pool.map(client, shares) for r in rs]
    return time.perf_counter() - start, results


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", help="a llama_jax checkpoint (default: a random 4-layer model)")
    parser.add_argument("--tokenizer", help="its tokenizer (with --ckpt)")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--prompt", type=int, default=32, help="prompt length in tokens")
    parser.add_argument("--clients", default="1,4,16")
    parser.add_argument("--slots", type=int, default=16)
    parser.add_argument(
        "--max-len", type=int, default=None, help="tokens per slot (default: prompt + output)"
    )
    args = parser.parse_args()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    args.max_len = args.max_len or -(-(args.prompt + args.max_tokens) // 64) * 64

    from llama_jax.config import SamplingConfig
    from llama_jax.generate import generate as llama_generate
    from llama_jax.generate import load_model
    from llama_jax.quantize import unstack_layers

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        ckpt, tokenizer = (args.ckpt, args.tokenizer) if args.ckpt else make_model(root, args.max_len)
        cfg, params, _ = load_model(str(ckpt), None, str(tokenizer))
        rng = np.random.default_rng(0)
        prompts = [rng.integers(1, 300, args.prompt).tolist() for _ in range(args.requests)]

        # One at a time through generate (the same greedy work, no stop token), compiled first:
        # as loaded (scanned layers, as training writes them), and with the layers unrolled as
        # the server runs them (faster one token at a time on a CPU).
        sampling = SamplingConfig(args.max_tokens)
        baselines = []
        for name, (model_cfg, model_params) in {
            "generate, one at a time": (cfg, params),
            "generate, one at a time, layers unrolled": (
                cfg.replace(scan_layers=False),
                unstack_layers(params, cfg),
            ),
        }.items():
            llama_generate(model_params, model_cfg, [prompts[0]], sampling)
            start = time.perf_counter()
            for prompt in prompts:
                llama_generate(model_params, model_cfg, [prompt], sampling)
            seconds = time.perf_counter() - start
            baselines.append((name, args.requests / seconds, args.requests * args.max_tokens / seconds))
        sequential_tps = max(tps for _, _, tps in baselines)  # the faster of the two

        process, url = start_server(ckpt, tokenizer, args.slots, args.max_len, root / "server.log")
        try:
            stream_one(url, prompts[0], 4)  # a first request through the whole path
            rows = [(name, rps, tps, None, None, tps / sequential_tps) for name, rps, tps in baselines]
            for clients in [int(c) for c in args.clients.split(",")]:
                wall, results = run_clients(url, prompts, args.max_tokens, clients)
                tokens = sum(r[2] for r in results)
                ttft = np.array([r[0] for r in results]) * 1000
                gaps = np.array([g for r in results for g in r[1]]) * 1000
                tps = tokens / wall
                rows.append(
                    (
                        f"server, {clients} clients",
                        args.requests / wall,
                        tps,
                        ttft,
                        gaps,
                        tps / sequential_tps,
                    )
                )
        finally:
            process.terminate()
            process.wait(30)

    print(
        f"\n{args.requests} requests of {args.prompt} prompt tokens and {args.max_tokens} output tokens, "
        f"greedy; server slots {args.slots}; {cfg.n_layers} layers, dim {cfg.dim}"
    )
    print(
        "| | requests/s | output tokens/s | TTFT median / p99 (ms) | ITL median / p99 (ms) | tokens/s vs best one at a time |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for name, rps, tps, ttft, gaps, ratio in rows:
        ttft_s = "" if ttft is None else f"{np.median(ttft):.0f} / {np.percentile(ttft, 99):.0f}"
        gaps_s = "" if gaps is None else f"{np.median(gaps):.1f} / {np.percentile(gaps, 99):.1f}"
        print(f"| {name} | {rps:.2f} | {tps:.0f} | {ttft_s} | {gaps_s} | {ratio:.1f}x |")


if __name__ == "__main__":
    main()
