"""Weight memory and perplexity of a small model, unquantized vs int8 vs fp8.

    PYTHONPATH=. python experiments/quantization_report.py [--steps 150] [--workdir /tmp/qreport]

Trains a small Llama (6 layers, so that fp8 quantizes the 4 middle feed-forward layers) for a few
hundred steps on synthetic text with a SentencePiece tokenizer trained on the same kind of text,
then measures each quantization's weight bytes and its perplexity on held-out documents. It also
prints the weight bytes of a full-size preset, computed from shapes alone (no memory needed).
Not an experiment for `llama_jax.train` (it defines no `experiment()`).
"""

from __future__ import annotations

import argparse
import functools
import time
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np
import optax

from llama_jax.config import ModelConfig, model_preset
from llama_jax.data.synthetic import random_documents, write_sentencepiece_model
from llama_jax.eval import format_table, perplexity
from llama_jax.loss import cross_entropy_sum, next_token_targets
from llama_jax.model import Llama, abstract_params, init_params, lm_head
from llama_jax.quantize import MODES, quantize_params, weight_bytes
from llama_jax.tokenizer import load_tokenizer

CFG = ModelConfig(
    dim=192, n_layers=6, n_heads=6, n_kv_heads=2, head_dim=32, ffn_dim=512, vocab_size=400, max_seq_len=128
)
BATCH = 16


def _batches(token_docs, seq_len, rng):
    """Random seq_len-token crops of the concatenated documents, forever."""
    stream = np.concatenate([np.asarray(d, np.int32) for d in token_docs])
    while True:
        starts = rng.integers(0, len(stream) - seq_len, BATCH)
        tokens = np.stack([stream[s : s + seq_len] for s in starts])
        yield {"tokens": tokens, "segment_ids": np.ones_like(tokens), "loss_mask": np.ones_like(tokens)}


def train(token_docs, steps: int):
    schedule = optax.warmup_cosine_decay_schedule(0, 3e-3, min(20, steps - 1), steps, 3e-4)
    optimizer = optax.adamw(schedule, weight_decay=0.01)
    params = init_params(CFG, jax.random.key(0))
    opt_state = optimizer.init(params)

    def loss_fn(params, batch):
        hidden = Llama(CFG).apply({"params": params}, batch["tokens"], method=Llama.hidden)
        total, count = cross_entropy_sum(hidden, lm_head(params, CFG), *next_token_targets(batch))
        return total / count

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    batches = _batches(token_docs, CFG.max_seq_len, np.random.default_rng(0))
    for i in range(steps):
        params, opt_state, loss = step(params, opt_state, next(batches))
        if i % 50 == 0 or i == steps - 1:
            print(f"step {i:4d}  loss {float(loss):.4f}", flush=True)
    return params


def preset_bytes(name: str) -> list[tuple[str, str]]:
    """Weight bytes of a preset in bf16 and quantized, from shapes only."""
    cfg = model_preset(name).replace(param_dtype="bfloat16")
    shapes = nn.meta.unbox(abstract_params(cfg))
    rows = [(f"{name} bf16 weight bytes", f"{weight_bytes(shapes):,}")]
    for mode in MODES:
        quantized = jax.eval_shape(lambda p, mode=mode: quantize_params(p, cfg, mode)[1], shapes)
        rows.append((f"{name} {mode} weight bytes", f"{weight_bytes(quantized):,}"))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--workdir", default="/tmp/quantization_report")
    parser.add_argument("--preset", default="llama3_8b")
    args = parser.parse_args(argv)

    tokenizer = load_tokenizer(write_sentencepiece_model(str(Path(args.workdir) / "tok"), vocab_size=400))
    train_docs = [tokenizer.encode(t, bos=True) for t in random_documents(3000, seed=10)]
    heldout = [tokenizer.encode(t, bos=True) for t in random_documents(200, seed=11)]
    start = time.time()
    params = train(train_docs, args.steps)
    print(f"trained {args.steps} steps in {time.time() - start:.0f} s")

    table = []
    baseline = None
    for mode in (None,) + MODES:
        cfg, qparams = (CFG, params) if mode is None else quantize_params(params, CFG, mode)
        result = perplexity(qparams, cfg, heldout, batch_size=16)
        baseline = baseline or result
        name = mode or "none"
        table += [
            (f"{name} weight bytes", f"{weight_bytes(qparams):,}"),
            (f"{name} mean NLL", f"{result.nll:.6f}"),
            (f"{name} perplexity", f"{result.perplexity:.5f}"),
            (f"{name} perplexity change", f"{result.perplexity / baseline.perplexity - 1:+.4%}"),
        ]
    table.append(("held-out tokens", f"{baseline.tokens:,}"))
    print(format_table(table + preset_bytes(args.preset)))


if __name__ == "__main__":
    main()
