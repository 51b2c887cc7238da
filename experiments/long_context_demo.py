"""Long context on a CPU: a tiny Llama learns passkey retrieval at a short context, then is extended
in phases to 8x that context with Llama 3.1's RoPE scaling, for two seeds.

    python experiments/long_context_demo.py [--seeds 0 1] [--workdir runs/long_context_demo] [--smoke]
                                            [--short-steps 1000] [--extension-steps 500]

The task (passkey retrieval): a document says "There is a pass key hidden in this text...", then
filler sentences ("The grass is green. The sky is blue. ..."), somewhere among them "The pass key
is 7 2 9 1 4. Remember it.", and at the end "What is the pass key? The pass key is 7 2 9 1 4."
A model retrieves the key when it predicts all five digits of the last sentence (greedy, from
the document before each digit): chance is 1 in 100,000.

One training run per seed, in phases (Experiment.phases, docs/reference.md "Training in phases"):

    short  the Python standard library (the default corpus) mixed with passkey documents of up
           to 1x = `base_len` tokens (most of the tokens), at seq_len 1x
    2x, 4x, 8x
           the context doubled three times, each phase on passkey documents up to its length
           mixed with the corpus, with the RoPE scaling of Llama 3.1 (factor 8, the original
           context 1x); the learning rate follows the run's cosine

Retrieval accuracy on held-out documents of 1x, 2x, 4x and 8x the original length is measured
before the extension (the checkpoint at the end of `short`, plain RoPE) and after it (the end of
the run), and printed as a table with the mean over seeds, also written to WORKDIR/summary.json.
A finished seed is not trained again. --smoke runs a toy scale in a few minutes (the numbers mean
nothing).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys
import time
from pathlib import Path

FILLER = (
    "The grass is green.",
    "The sky is blue.",
    "The sun is yellow.",
    "Here we go.",
    "There and back again.",
)
INTRO = "There is a pass key hidden in this text. Find it and remember it."
MULTIPLES = (1, 2, 4, 8)


@dataclasses.dataclass(frozen=True)
class Scale:
    base_len: int = 128  # the short context, in tokens (8x: 1024)
    dim: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2
    ffn_dim: int = 384
    vocab_size: int = 512  # a SentencePiece model of the corpus this size: digits are single tokens
    tokens_per_step: int = 2048
    # Retrieval at 1x appears after 800-1000 steps; the rest of the budget goes to the extension.
    short_steps: int = 1000
    extension_steps: int = 500  # each of 2x, 4x, 8x
    lr: float = 3e-3
    # Mixing is by documents, and a corpus file is thousands of tokens: this weight makes the
    # passkey documents most of the tokens.
    corpus_weight: float = 0.02
    train_documents: int = 20000  # passkey documents per length band
    eval_documents: int = 50  # per length
    seeds: tuple[int, ...] = (0, 1)


SMOKE = Scale(
    base_len=64, dim=64, n_layers=2, short_steps=30, extension_steps=5, train_documents=400, eval_documents=8
)


def passkey_document(rng: random.Random, length: int, tokenizer) -> tuple[str, str]:
    """(text, key) of a passkey document of at most `length` tokens (with BOS and EOS), padded
    with filler to near that length, the key at a random depth."""
    key = " ".join(str(rng.randrange(10)) for _ in range(5))
    needle = f"The pass key is {key}. Remember it. {key} is the pass key."
    question = f"What is the pass key? The pass key is {key}."
    # Sentences joined by spaces tokenize to the sum of their tokens (BOS and EOS: 2 more).
    used = 2 + sum(_tokens(tokenizer, part) for part in (INTRO, needle, question))
    filler: list[str] = []
    while True:
        sentence = rng.choice(FILLER)
        if used + _tokens(tokenizer, sentence) > length:
            break
        filler.append(sentence)
        used += _tokens(tokenizer, sentence)
    depth = rng.randint(0, len(filler))
    return " ".join([INTRO, *filler[:depth], needle, *filler[depth:], question]), key


_TOKEN_COUNTS: dict[str, int] = {}


def _tokens(tokenizer, sentence: str) -> int:
    if sentence not in _TOKEN_COUNTS:
        _TOKEN_COUNTS[sentence] = len(tokenizer.encode(sentence, bos=False))
    return _TOKEN_COUNTS[sentence]


def write_documents(path: Path, rng: random.Random, low: int, high: int, count: int, tokenizer) -> None:
    """`count` passkey documents of lengths drawn from [low, high] tokens, as JSONL."""
    with open(path, "w") as out:
        for _ in range(count):
            text, _ = passkey_document(rng, rng.randint(low, high), tokenizer)
            out.write(json.dumps({"text": text}) + "\n")


def make_data(root: Path, scale: Scale, tokenizer) -> list[Path]:
    """The passkey training sources, one per band (up to 1x, 1x-2x, 2x-4x, 4x-8x), made once."""
    root.mkdir(parents=True, exist_ok=True)
    paths, low = [], scale.base_len // 2
    for index, multiple in enumerate(MULTIPLES):
        path = root / f"passkey_{multiple}x.jsonl"
        if not path.exists():
            partial = path.with_suffix(".partial")
            write_documents(
                partial,
                random.Random(1000 + index),
                low,
                multiple * scale.base_len,
                scale.train_documents // multiple,  # longer documents, as many tokens
                tokenizer,
            )
            partial.rename(path)
        paths.append(path)
        low = multiple * scale.base_len // 2
    return paths


def demo_experiment(scale: Scale, seed: int, tokenizer_path: str, passkeys: list[Path]):
    from llama_jax.config import (
        CheckpointConfig,
        Experiment,
        OptimConfig,
        Phase,
        RopeScaling,
        TrainConfig,
        model_preset,
    )
    from llama_jax.data.config import STDLIB_TRAIN, DataConfig, SourceConfig

    base = scale.base_len
    corpus = STDLIB_TRAIN.sources[0]
    sources = (corpus, *(SourceConfig(str(p), kind="jsonl", field="text", name=p.stem) for p in passkeys))
    scaling = RopeScaling(factor=8.0, original_max_position_embeddings=base)

    def phase(name: str, multiple: int, steps: int) -> Phase:
        # The corpus and this phase's passkey band (the other bands left out).
        band = MULTIPLES.index(multiple) + 1
        mixture = tuple(
            scale.corpus_weight if i == 0 else 1.0 if i == band else 0.0 for i in range(len(sources))
        )
        return Phase(
            name=name,
            tokens=steps * scale.tokens_per_step,
            seq_len=multiple * base,
            batch_size=scale.tokens_per_step // (multiple * base),
            mixture=mixture,
            rope_scaling=scaling if multiple > 1 else None,
        )

    phases = (
        phase("short", 1, scale.short_steps),
        *(phase(f"{m}x", m, scale.extension_steps) for m in MULTIPLES[1:]),
    )
    steps = scale.short_steps + 3 * scale.extension_steps
    model = model_preset("tiny").replace(
        dim=scale.dim,
        n_layers=scale.n_layers,
        n_heads=scale.n_heads,
        n_kv_heads=scale.n_kv_heads,
        head_dim=scale.dim // scale.n_heads,
        ffn_dim=scale.ffn_dim,
        vocab_size=scale.vocab_size,
        max_seq_len=MULTIPLES[-1] * base,
    )
    return Experiment(
        name=f"long_context_demo_seed{seed}",
        model=model,
        optim=OptimConfig(peak_lr=scale.lr, warmup_steps=50, final_lr_ratio=0.1, weight_decay=0.1),
        train=TrainConfig(
            steps=steps,
            batch_size=scale.tokens_per_step // base,
            seq_len=base,
            log_every=50,
            eval_every=10**9,
            eval_batches=0,
            seed=seed,
            sample_tokens=0,
        ),
        # The end of `short` is kept for the "before" measurement.
        checkpoint=CheckpointConfig(every_steps=0, keep_last=2, keep_every=scale.short_steps),
        data=DataConfig(sources=sources, tokenizer_path=tokenizer_path),
        eval_data=None,
        phases=phases,
    )


def retrieval_accuracy(checkpoint: Path, tokenizer, length: int, scale: Scale) -> float:
    """The share of held-out passkey documents of about `length` tokens whose five key digits the
    checkpoint's model predicts greedily, each from the document before it."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from llama_jax.checkpoint import load_for_inference
    from llama_jax.model import Llama

    cfg, params = load_for_inference(checkpoint)
    rng = random.Random(424242 + length)  # the same documents for every checkpoint
    docs = [passkey_document(rng, length, tokenizer) for _ in range(scale.eval_documents)]
    rows = [tokenizer.encode(text, bos=True, eos=False) for text, _ in docs]
    width = max(len(r) for r in rows)
    tokens = np.zeros((len(rows), width), np.int32)
    segments = np.zeros((len(rows), width), np.int32)
    for i, row in enumerate(rows):
        tokens[i, : len(row)], segments[i, : len(row)] = row, 1
    forward = jax.jit(lambda p, t, s: jnp.argmax(Llama(cfg).apply({"params": p}, t, None, s), axis=-1))
    predicted = np.concatenate(
        [np.asarray(forward(params, tokens[i : i + 8], segments[i : i + 8])) for i in range(0, len(rows), 8)]
    )
    correct = 0
    for i, (row, (_, key)) in enumerate(zip(rows, docs)):
        # The answer's digits are the last five digit tokens of the document.
        digits = [t for t in range(len(row)) if tokenizer.decode([row[t]]).strip().isdigit()][-5:]
        answer = "".join(tokenizer.decode([row[t]]).strip() for t in digits)
        assert answer == key.replace(" ", ""), "the key's digits are not single tokens"
        correct += all(predicted[i, t - 1] == row[t] for t in digits)
    return correct / len(rows)


def run_seed(seed: int, scale: Scale, root: Path, tokenizer, tokenizer_path: str, passkeys, log) -> dict:
    from llama_jax.train import train

    workdir = root / f"seed{seed}"
    result_path = workdir / "retrieval.json"
    settings = json.loads(json.dumps(dataclasses.asdict(scale)))  # as read back: tuples are lists
    if result_path.exists():
        result = json.loads(result_path.read_text())
        if result.get("scale", settings) != settings:
            raise SystemExit(
                f"{workdir} holds seed {seed} trained with other settings: use another --workdir."
            )
        return result
    exp = demo_experiment(scale, seed, tokenizer_path, passkeys)
    started = time.time()
    train(exp, workdir, quiet=True)
    trained_s = time.time() - started
    before, after = (
        workdir / "checkpoints" / str(scale.short_steps),
        workdir / "checkpoints" / str(exp.train.steps),
    )
    result = {"train_seconds": trained_s, "scale": settings}
    for name, checkpoint in (("before", before), ("after", after)):
        result[name] = {
            f"{m}x": retrieval_accuracy(checkpoint, tokenizer, m * scale.base_len, scale) for m in MULTIPLES
        }
        log(f"seed {seed} {name}: " + ", ".join(f"{k} {v:.0%}" for k, v in result[name].items()))
    result_path.write_text(json.dumps(result, indent=1))
    return result


def table(results: dict[int, dict], scale: Scale) -> str:
    lengths = [f"{m}x ({m * scale.base_len})" for m in MULTIPLES]
    lines = [
        "| model | seed | " + " | ".join(lengths) + " |",
        "|---|---|" + "---|" * len(lengths),
    ]
    for name, label in (("before", "before extension"), ("after", "after extension")):
        for seed, result in results.items():
            cells = " | ".join(f"{result[name][f'{m}x']:.0%}" for m in MULTIPLES)
            lines.append(f"| {label} | {seed} | {cells} |")
        means = [sum(r[name][f"{m}x"] for r in results.values()) / len(results) for m in MULTIPLES]
        lines.append(f"| {label} | mean | " + " | ".join(f"{v:.0%}" for v in means) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--workdir", default="runs/long_context_demo")
    parser.add_argument("--smoke", action="store_true", help="toy scale, a few minutes: proves it runs")
    parser.add_argument("--short-steps", type=int, help=f"steps at 1x (default {Scale.short_steps})")
    parser.add_argument(
        "--extension-steps", type=int, help=f"steps of each longer phase (default {Scale.extension_steps})"
    )
    args = parser.parse_args(argv)

    from llama_jax.data.config import STDLIB_TRAIN
    from llama_jax.data.training import cached_tokenizer
    from llama_jax.tokenizer import load_tokenizer

    scale = SMOKE if args.smoke else Scale()
    for name in ("short_steps", "extension_steps"):
        if getattr(args, name) is not None:
            if getattr(args, name) < 1:
                parser.error(f"--{name.replace('_', '-')} must be at least 1")
            scale = dataclasses.replace(scale, **{name: getattr(args, name)})
    root = Path(args.workdir)
    log = lambda message: print(message, flush=True)  # noqa: E731
    tokenizer_path = cached_tokenizer(STDLIB_TRAIN, scale.vocab_size, quiet=False)
    tokenizer = load_tokenizer(tokenizer_path)
    started = time.time()
    passkeys = make_data(root / "data", scale, tokenizer)
    results = {
        seed: run_seed(seed, scale, root, tokenizer, tokenizer_path, passkeys, log) for seed in args.seeds
    }
    summary = {"scale": dataclasses.asdict(scale), "results": results, "seconds": time.time() - started}
    (root / "summary.json").write_text(json.dumps(summary, indent=1))
    print(table(results, scale))
    print(f"({time.time() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
