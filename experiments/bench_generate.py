"""Decode throughput: llama_jax's `generate` against transformers' `generate` on the same weights,
greedy, fp32 on the CPU, at batch 1 and 8, side by side in one run.

    python experiments/bench_generate.py [--new-tokens 128] [--prompt 32] [--preset tiny]

Both generate exactly --new-tokens tokens (no stop token); compilation is excluded (one call
first), the best of 3 timed calls counts.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np


def best_of(fn, repeats: int = 3) -> float:
    fn()  # compile / warm up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--batches", default="1,8")
    args = parser.parse_args()

    import torch
    import transformers

    from llama_jax.config import SamplingConfig, model_preset
    from llama_jax.convert import load_hf
    from llama_jax.generate import generate

    torch.set_num_threads(os.cpu_count())
    cfg = model_preset(args.preset)
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
        )
    ).eval()
    model.generation_config.eos_token_id = None
    with tempfile.TemporaryDirectory() as directory:
        model.save_pretrained(directory)
        cfg, params = load_hf(directory)
    cfg = cfg.replace(compute_dtype="float32")
    print(
        f"model {args.preset} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters), "
        f"prompt {args.prompt}, {args.new_tokens} new tokens, greedy, fp32, {os.cpu_count()} cores"
    )
    rng = np.random.default_rng(0)
    for batch in (int(b) for b in args.batches.split(",")):
        prompts = rng.integers(1, cfg.vocab_size, (batch, args.prompt))
        ours = best_of(lambda: generate(params, cfg, prompts.tolist(), SamplingConfig(args.new_tokens)))
        ids = torch.as_tensor(prompts, dtype=torch.long)

        def hf():
            with torch.no_grad():
                model.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=args.new_tokens,
                    do_sample=False,
                    pad_token_id=0,
                )

        theirs = best_of(hf)
        tokens = batch * args.new_tokens
        print(
            f"batch {batch}: llama_jax {tokens / ours:9,.0f} tokens/s   transformers "
            f"{tokens / theirs:9,.0f} tokens/s   ratio {theirs / ours:.2f}x"
        )


if __name__ == "__main__":
    main()
