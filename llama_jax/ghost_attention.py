"""Ghost Attention (Llama 2, section 3.3): SFT data that teaches a model to keep a system
instruction over many turns.

    python -m llama_jax.ghost_attention --ckpt POLICY --dialogs dialogs.jsonl --out gatt.jsonl

Each input line is a dialog whose first message is the system instruction, followed by the user
turns (assistant turns in it are ignored): `{"messages": [{"role": "system", "content": "Answer
in words, not digits."}, {"role": "user", ...}, ...]}`. For every dialog, turn by turn, a reply is
sampled from the policy with the instruction attached to every user message (so the model keeps
to it). The line written is the dialog as it will be trained: the instruction only as the system
message, the user messages as they were, the sampled replies, and the loss on the last reply
only (the earlier replies carry `"weight": 0`, OpenAI's per-message format that the llama2 and
llama3 chat templates read). Train on --out with an SFT experiment
(`data.sources.0.path=gatt.jsonl`).

Dialogs are sampled together, one turn at a time, with `generate` (the jitted KV-cache decoder).
A dialog that would outgrow the model's context stops at its last turn that fits. The output is
written whole, at the end, through a temporary file. Bad input (a dialog without a system
instruction or without a user turn) is one sentence and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from llama_jax.chat_template import ChatTemplateError, default_template, encode_chat


class GhostAttentionError(ValueError):
    """Bad input; one sentence for the user."""


def with_instruction(instruction: str, users: list[str], replies: list[str]) -> list[dict]:
    """The messages a reply is sampled from: the instruction attached to every user message."""
    messages = []
    for i, user in enumerate(users):
        messages.append({"role": "user", "content": f"{user}\n\n{instruction}"})
        if i < len(replies):
            messages.append({"role": "assistant", "content": replies[i]})
    return messages


def training_dialog(instruction: str, users: list[str], replies: list[str]) -> list[dict]:
    """The dialog as trained: the instruction once, as the system message; every reply but the
    last with weight 0 (context only)."""
    messages = [{"role": "system", "content": instruction}]
    for i, (user, reply) in enumerate(zip(users, replies)):
        messages.append({"role": "user", "content": user})
        last = i == len(replies) - 1
        messages.append({"role": "assistant", "content": reply, **({} if last else {"weight": 0})})
    return messages


def read_dialogs(path: str) -> list[tuple[str, list[str]]]:
    """(instruction, user messages) of each dialog in the JSONL file."""
    dialogs = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise GhostAttentionError(f"Cannot read {path} ({err}).") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            messages = json.loads(line)["messages"]
            roles = [m["role"] for m in messages]
            contents = [m["content"] for m in messages]
        except (ValueError, KeyError, TypeError):
            raise GhostAttentionError(
                f"{where} is not a dialog: a JSON object with a list of messages."
            ) from None
        if not roles or roles[0] != "system" or not isinstance(contents[0], str) or not contents[0].strip():
            raise GhostAttentionError(
                f"{where} has no system instruction: Ghost Attention needs the dialog's first message "
                "to be the system instruction it keeps over the turns."
            )
        users = [c for r, c in zip(roles, contents) if r == "user"]
        if not users:
            raise GhostAttentionError(f"{where} has no user turn.")
        dialogs.append((contents[0].strip(), [str(u) for u in users]))
    if not dialogs:
        raise GhostAttentionError(f"{path} has no dialog.")
    return dialogs


def run(args) -> dict:
    """Samples every dialog's replies and writes --out; returns {"written", "shortened", "skipped"}."""
    from llama_jax.generate import generate, load_model, sampling_from_flags
    from llama_jax.posttrain.inputs import recorded_tokenizer

    sampling = sampling_from_flags(args)
    dialogs = read_dialogs(args.dialogs)
    tokenizer_path = args.tokenizer or (recorded_tokenizer(args.ckpt) if args.ckpt else None)
    cfg, params, tokenizer = load_model(args.ckpt, args.hf, tokenizer_path)
    if "score" in params:
        raise GhostAttentionError(f"{args.ckpt} is a reward model, not a policy to sample from.")
    template = args.template or default_template(tokenizer)
    stops = set(tokenizer.stop_ids)
    replies: list[list[str]] = [[] for _ in dialogs]
    active = set(range(len(dialogs)))  # dialogs still being extended
    for turn in range(max(len(users) for _, users in dialogs)):
        rows = []
        for i in sorted(active):
            instruction, users = dialogs[i]
            if turn >= len(users):
                active.discard(i)
                continue
            messages = with_instruction(instruction, users[: turn + 1], replies[i])
            ids = encode_chat(tokenizer, messages, template=template, add_generation_prompt=True).ids
            if len(ids) + sampling.max_new_tokens > cfg.max_seq_len:
                active.discard(i)  # stops at its last turn that fits
                continue
            rows.append((i, ids))
        for start in range(0, len(rows), args.batch_dialogs):
            batch = rows[start : start + args.batch_dialogs]
            samples = generate(
                params,
                cfg,
                [ids for _, ids in batch],
                sampling,
                stop_tokens=tokenizer.stop_ids,
                seed=args.seed * 1_000_003 + turn * 10_007 + start,
                prompt_bucket=32,
            )
            for (i, _), sample in zip(batch, samples):
                replies[i].append(tokenizer.decode([t for t in sample if t not in stops]).strip())
        if not args.quiet:
            print(f"turn {turn + 1}: {len(rows)} replies sampled", file=sys.stderr, flush=True)
    counts = {"written": 0, "shortened": 0, "skipped": 0}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    with open(partial, "w", encoding="utf-8") as sink:
        for (instruction, users), own in zip(dialogs, replies):
            if not own:
                counts["skipped"] += 1  # even its first turn outgrows the context
                continue
            counts["shortened"] += len(own) < len(users)
            record = {"messages": training_dialog(instruction, users[: len(own)], own)}
            sink.write(json.dumps(record) + "\n")
            counts["written"] += 1
        sink.flush()
        os.fsync(sink.fileno())
    os.replace(partial, out)
    return counts


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m llama_jax.ghost_attention", description=__doc__.splitlines()[0]
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--ckpt", help="the policy: a llama_jax parameters checkpoint or training workdir")
    source.add_argument("--hf", help="the policy: a Hugging Face model directory")
    parser.add_argument("--tokenizer", help="tokenizer.model (default: the one the --ckpt run recorded)")
    parser.add_argument(
        "--dialogs", required=True, help="JSONL dialogs: a system instruction, then user turns"
    )
    parser.add_argument("--out", required=True, help="the SFT JSONL to write")
    parser.add_argument("--batch-dialogs", type=int, default=16, help="dialogs per generation batch")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--template", choices=("llama2", "llama3"), default=None, help="chat format")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true")
    return parser


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    from llama_jax.checkpoint import CheckpointError
    from llama_jax.config import ConfigError
    from llama_jax.convert import ConversionError
    from llama_jax.generate import GenerationError

    try:
        if args.batch_dialogs < 1:
            raise GhostAttentionError("--batch-dialogs must be at least 1.")
        counts = run(args)
    except (
        GhostAttentionError,
        ChatTemplateError,
        GenerationError,
        CheckpointError,
        ConversionError,
        ConfigError,
    ) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not args.quiet:
        print(
            f"wrote {counts['written']} dialogs to {args.out} ({counts['shortened']} cut short at the "
            f"model's context, {counts['skipped']} too long to sample at all)",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
