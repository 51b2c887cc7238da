"""Rejection sampling's core: K responses per prompt from the jitted decoder, scored by a reward
model or a function, the best kept (and the worst, for DPO pairs), written batch by batch so a
stopped run resumes. `python -m llama_jax.rejection_sample` is its command line (the record
format is described there); posttrain.rounds runs it inside Llama 3's loop."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np

from llama_jax.chat_template import default_template, encode_chat
from llama_jax.posttrain.reward import load_scorer


class RejectionSamplingError(ValueError):
    """Bad input; one sentence for the user."""


def done_ids(out: Path) -> set[str]:
    """Ids already written to `out`; a last line cut short by a killed run is removed."""
    if not out.exists():
        return set()
    data = out.read_bytes()
    good = data if data.endswith(b"\n") or not data else data[: data.rfind(b"\n") + 1]
    if len(good) != len(data):
        print(
            f"warning: {out} ended with an incomplete line (an interrupted run); removed it.", file=sys.stderr
        )
        with open(out, "r+b") as f:
            f.truncate(len(good))
    ids = set()
    for number, line in enumerate(good.decode("utf-8").splitlines(), start=1):
        try:
            ids.add(str(json.loads(line)["id"]))
        except (ValueError, KeyError, TypeError):
            raise RejectionSamplingError(
                f"{out} line {number} is not a record of an earlier run; choose another --out."
            ) from None
    return ids


def choose(scores: np.ndarray, finished: list[bool], pairs: bool) -> tuple[int, int | None]:
    """(best, worst or None) indices among the finished samples (all, if none finished)."""
    candidates = [i for i, f in enumerate(finished) if f] or list(range(len(scores)))
    best = max(candidates, key=lambda i: scores[i])
    if not pairs:
        return best, None
    worst = min(candidates, key=lambda i: scores[i])
    return best, (worst if scores[worst] < scores[best] else None)


def _seed(base: int, ids: list[str]) -> int:
    digest = hashlib.sha256(("\n".join(ids) + f"\n{base}").encode()).digest()
    return int.from_bytes(digest[:4], "little")


def _prompts_to_sample(prompts, already, tokenizer, template, max_new_tokens: int, cfg):
    """(prompt, chat ids) of the prompts still to sample, and the counts of those skipped."""
    todo, counts = [], {"written": 0, "skipped_done": 0, "skipped_long": 0, "skipped_bad": 0}
    for prompt in prompts:
        if prompt["id"] in already:
            counts["skipped_done"] += 1
            continue
        try:
            ids = encode_chat(
                tokenizer, prompt["messages"], template=template, add_generation_prompt=True
            ).ids
        except ValueError as err:
            print(f"warning: prompt {prompt['id']} skipped: {err}", file=sys.stderr)
            counts["skipped_bad"] += 1
            continue
        if len(ids) + max_new_tokens > cfg.max_seq_len:
            counts["skipped_long"] += 1
            continue
        todo.append((prompt, ids))
    return todo, counts


def _checked_settings(args) -> float:
    """Refuses out-of-range counts and a stray or out-of-range --safety-threshold, before any model
    loads; returns the safety threshold (Llama 2's 0.15 unless given)."""
    if args.k < 1 or args.batch_prompts < 1 or args.max_new_tokens < 1:
        raise RejectionSamplingError("--k, --batch-prompts and --max-new-tokens must be at least 1.")
    if args.pairs and args.k < 2:
        raise RejectionSamplingError("--pairs needs --k of at least 2.")
    if args.safety_threshold is not None and not (args.safety_reward_model or args.safety_score):
        raise RejectionSamplingError("--safety-threshold goes with --safety-reward-model or --safety-score.")
    threshold = 0.15 if args.safety_threshold is None else args.safety_threshold
    if not 0.0 < threshold < 1.0:
        raise RejectionSamplingError(f"--safety-threshold is a probability in (0, 1), got {threshold}.")
    return threshold


def run(args) -> dict:
    """Samples, scores and writes; returns counts {"written", "skipped_done", "skipped_long",
    "skipped_bad"}."""
    from llama_jax.generate import generate, load_model, sampling_from_flags
    from llama_jax.posttrain.data import load_prompts
    from llama_jax.posttrain.inputs import recorded_tokenizer

    threshold = _checked_settings(args)
    sampling = sampling_from_flags(args)
    tokenizer_path = args.tokenizer or (recorded_tokenizer(args.ckpt) if args.ckpt else None)
    cfg, params, tokenizer = load_model(args.ckpt, args.hf, tokenizer_path)
    if "score" in params:
        raise RejectionSamplingError(f"{args.ckpt} is a reward model, not a policy to sample from.")
    template = args.template or default_template(tokenizer)
    scorer = load_scorer(
        reward_model=args.reward_model or "",
        score_fn=args.score or "",
        vocab_size=cfg.vocab_size,
        safety_reward_model=args.safety_reward_model or "",
        safety_score_fn=args.safety_score or "",
        safety_threshold=threshold,
    )
    try:
        prompts = load_prompts(args.prompts)
    except (FileNotFoundError, ValueError) as err:
        raise RejectionSamplingError(str(err).rstrip(".") + ".") from None
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    todo, counts = _prompts_to_sample(prompts, done_ids(out), tokenizer, template, args.max_new_tokens, cfg)
    if counts["skipped_long"]:
        print(
            f"warning: {counts['skipped_long']} prompts skipped: with --max-new-tokens "
            f"{args.max_new_tokens} they exceed the model's context of {cfg.max_seq_len}.",
            file=sys.stderr,
        )
    stops = set(tokenizer.stop_ids)
    with open(out, "a", encoding="utf-8") as sink:
        for start in range(0, len(todo), args.batch_prompts):
            batch = todo[start : start + args.batch_prompts]
            rows = [ids for _, ids in batch for _ in range(args.k)]
            samples = generate(
                params,
                cfg,
                rows,
                sampling,
                stop_tokens=tokenizer.stop_ids,
                seed=_seed(args.seed, [p["id"] for p, _ in batch]),
                prompt_bucket=32,
            )
            finished = [bool(s) and s[-1] in stops for s in samples]
            texts = [tokenizer.decode([t for t in s if t not in stops]).strip() for s in samples]
            records = [{**p["record"], "messages": p["messages"]} for p, _ in batch for _ in range(args.k)]
            scores = scorer(records, rows, samples, texts)
            for i, (prompt, _) in enumerate(batch):
                span = slice(i * args.k, (i + 1) * args.k)
                best, worst = choose(scores[span], finished[span], args.pairs)
                own_texts = texts[span]
                line = {
                    "id": prompt["id"],
                    "prompt": prompt["messages"],
                    "chosen": own_texts[best],
                    "chosen_score": float(scores[span][best]),
                    "messages": prompt["messages"] + [{"role": "assistant", "content": own_texts[best]}],
                    "scores": [float(s) for s in scores[span]],
                    "finished": finished[span],
                }
                if worst is not None:
                    line.update(rejected=own_texts[worst], rejected_score=float(scores[span][worst]))
                sink.write(json.dumps(line) + "\n")
                counts["written"] += 1
            sink.flush()
            os.fsync(sink.fileno())
            if not args.quiet:
                print(
                    f"{counts['written'] + counts['skipped_done']}/{len(prompts)} prompts done",
                    file=sys.stderr,
                    flush=True,
                )
    return counts


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m llama_jax.rejection_sample",
        description="Sample K responses per prompt, score them, keep the best (and the worst with "
        "--pairs); resumable.",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--ckpt", help="the policy: a llama_jax parameters checkpoint or training workdir")
    source.add_argument("--hf", help="the policy: a Hugging Face model directory")
    parser.add_argument("--tokenizer", help="tokenizer.model (default: the one the --ckpt run recorded)")
    parser.add_argument("--prompts", nargs="+", required=True, help="prompt JSONL files")
    parser.add_argument("--out", required=True, help="JSONL to append the kept responses to")
    scoring = parser.add_mutually_exclusive_group(required=True)
    scoring.add_argument("--reward-model", help="a reward model (an rm run's workdir)")
    scoring.add_argument("--score", help="module:function or file.py:function, fn(prompt, response) -> float")
    safety = parser.add_mutually_exclusive_group()
    safety.add_argument(
        "--safety-reward-model",
        help="Llama 2's safety reward model: its score where the prompt is tagged unsafe or it judges the response unsafe",
    )
    safety.add_argument("--safety-score", help="the same as a function, module:function")
    parser.add_argument(
        "--safety-threshold",
        type=float,
        default=None,
        help="a response is unsafe where sigmoid(safety score) is below this (default: Llama 2's 0.15)",
    )
    parser.add_argument("--k", type=int, default=10, help="samples per prompt (Llama 2/3: 10-30)")
    parser.add_argument("--pairs", action="store_true", help="also keep the worst sample (DPO pairs)")
    parser.add_argument("--batch-prompts", type=int, default=8, help="prompts per generation batch")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument(
        "--template",
        choices=("llama2", "llama3", "hf"),
        default=None,
        help="chat format (default: the tokenizer family's)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true")
    return parser


def run_from_args(argv: list[str]) -> dict:
    """`run` with the command line's arguments; errors are raised, not printed."""
    return run(parser().parse_args(argv))
