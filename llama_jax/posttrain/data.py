"""Post-training data: chat, preference and prompt JSONL as token rows with the right masks.

SFT      `{"messages": [{"role", "content"}, ...]}` per line: the pretraining pipeline with a chat
         source (`sft_source`): the model family's template, loss on the assistant replies only
         (each reply and the token that ends it), packed first-fit with segment ids so attention
         never crosses from one conversation to the next.
pairs    `{"prompt", "chosen", "rejected"[, "margin"]}` per line (reward model, DPO): `prompt` is a
         string (one user turn) or a list of messages ending with a user turn; `chosen` and
         `rejected` are strings or one assistant message. Each side is encoded as prompt + reply
         with the chat template, one sequence per row, right-padded.
prompts  `{"prompt": ...}` or `{"messages": [...]}` (trailing assistant turns dropped) per line, with
         an optional `"id"` (rejection sampling, PPO).

Masks of a pair's side (all [T]):
  loss_mask      the assistant mask: the reply's tokens and the token that ends it (the chosen
                 response's NLL in DPO);
  response_mask  the tokens DPO's log-ratios sum over: the loss mask without the special tokens
                 (Llama 3: the header, <|eot_id|> ...; Llama 2: </s>) when `mask_special_tokens`,
                 as Llama 3 does to keep the shared formatting tokens out of the preference.

Unusable records (not JSON, a missing field, an unknown role, no assistant turn, identical chosen
and rejected, too long for seq_len) are skipped and counted in `llama_jax.data.COUNTERS`, reasons
logged; a file with no usable record at all is an error.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any, Iterator

import numpy as np

from llama_jax.chat_template import encode_chat
from llama_jax.data.config import SourceConfig, sft_source  # noqa: F401 - part of this module's API
from llama_jax.data.pipeline import _shuffle
from llama_jax.data.sources import COUNTERS, SKIPPED, expand_paths
from llama_jax.tokenizer import Tokenizer

PAIR_SIDES = ("chosen", "rejected")


class BadRecord(ValueError):
    """A record that cannot be used; the message says why (it is counted, not raised to the user)."""


def special_token_ids(tokenizer: Tokenizer) -> frozenset[int]:
    """The ids of the tokenizer's special (formatting) tokens: Llama 3's 256, or BOS/EOS/pad."""
    special = getattr(tokenizer, "special_tokens", None)
    if special:
        return frozenset(special.values())
    return frozenset(i for i in (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) if i is not None)


# --- records -----------------------------------------------------------------------------------


def read_jsonl(paths: Sequence[str], name: str) -> Iterator[tuple[str, Any]]:
    """(where, record) of every non-blank line of the JSONL files; lines that are not JSON are
    counted as skipped."""
    for path in expand_paths(paths, "jsonl"):
        with open(path, encoding="utf-8", errors="replace") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                where = f"{path}:{number}"
                try:
                    yield where, json.loads(line)
                except ValueError:
                    COUNTERS.add(name, SKIPPED, f": {where} is not JSON")


def _messages(value: Any, what: str) -> list[dict]:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if isinstance(value, list) and value and all(isinstance(m, Mapping) for m in value):
        return [dict(m) for m in value]
    raise BadRecord(f"{what} is neither a string nor a list of messages")


def prompt_messages(record: Any) -> list[dict]:
    """The conversation to answer: `prompt` (a string or messages), or `messages` without its
    trailing assistant turns. It must end with a user turn."""
    if not isinstance(record, Mapping):
        raise BadRecord("the line is not a JSON object")
    if "prompt" in record:
        messages = _messages(record["prompt"], "'prompt'")
    elif "messages" in record:
        messages = _messages(record["messages"], "'messages'")
        while messages and messages[-1].get("role") == "assistant":
            messages.pop()
    else:
        raise BadRecord("it has neither 'prompt' nor 'messages'")
    if not messages or messages[-1].get("role") != "user":
        raise BadRecord("the prompt does not end with a user turn")
    return messages


def reply_message(value: Any, what: str) -> dict:
    """An assistant reply given as a string, a message, or a list of one message."""
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, str):
        return {"role": "assistant", "content": value}
    if (
        isinstance(value, Mapping)
        and value.get("role") == "assistant"
        and isinstance(value.get("content"), str)
    ):
        return {"role": "assistant", "content": value["content"]}
    raise BadRecord(f"{what} is not a string or one assistant message")


def encode_reply(
    tokenizer: Tokenizer,
    template: str,
    prompt: list[dict],
    reply: dict,
    special: frozenset[int],
    mask_special_tokens: bool,
) -> dict[str, np.ndarray]:
    """tokens, loss_mask and response_mask (see the module docstring) of prompt + reply."""
    try:
        chat = encode_chat(tokenizer, prompt + [reply], template=template)
    except ValueError as err:
        raise BadRecord(str(err).rstrip(".")) from None
    tokens = np.asarray(chat.ids, np.int32)
    loss_mask = np.asarray(chat.assistant_mask, np.float32)
    # Only the last reply is the response (a prompt may hold earlier assistant turns).
    last_start = len(tokens) - int(np.argmax(loss_mask[::-1] == 0))
    loss_mask[:last_start] = 0
    response_mask = loss_mask.copy()
    if mask_special_tokens:
        response_mask[np.isin(tokens, list(special))] = 0
    if not response_mask.any():
        raise BadRecord("a response is empty")
    return {"tokens": tokens, "loss_mask": loss_mask, "response_mask": response_mask}


def encode_pair(
    tokenizer: Tokenizer,
    template: str,
    record: Any,
    *,
    seq_len: int,
    special: frozenset[int],
    mask_special_tokens: bool = True,
) -> dict[str, Any]:
    """One preference record as {chosen_tokens, chosen_loss_mask, chosen_response_mask, rejected_...,
    margin}, or BadRecord."""
    prompt = prompt_messages(record)
    replies = {side: reply_message(record.get(side), repr(side)) for side in PAIR_SIDES}
    if replies["chosen"]["content"].strip() == replies["rejected"]["content"].strip():
        raise BadRecord("chosen and rejected are identical")
    margin = record.get("margin", 0.0)
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not np.isfinite(margin):
        raise BadRecord(f"'margin' is not a number: {margin!r}")
    pair: dict[str, Any] = {"margin": np.float32(margin)}
    for side in PAIR_SIDES:
        encoded = encode_reply(tokenizer, template, prompt, replies[side], special, mask_special_tokens)
        if len(encoded["tokens"]) > seq_len:
            raise BadRecord(f"it is longer than seq_len={seq_len} tokens")
        pair.update({f"{side}_{k}": v for k, v in encoded.items()})
    return pair


def load_pairs(
    paths: Sequence[str],
    tokenizer: Tokenizer,
    template: str,
    *,
    seq_len: int,
    mask_special_tokens: bool = True,
    name: str = "",
) -> list[dict]:
    """Every usable preference pair of the JSONL files, in file order; raises ValueError if none."""
    name = name or paths[0]
    special = special_token_ids(tokenizer)
    pairs, seen = [], 0
    for where, record in read_jsonl(paths, name):
        seen += 1
        try:
            pairs.append(
                encode_pair(
                    tokenizer,
                    template,
                    record,
                    seq_len=seq_len,
                    special=special,
                    mask_special_tokens=mask_special_tokens,
                )
            )
        except BadRecord as err:
            COUNTERS.add(name, SKIPPED, f": {where}: {err}")
    if not pairs:
        raise ValueError(
            f"{name} has no usable preference pairs ({seen} records; see the warnings "
            "above for why each was skipped)"
        )
    skipped = seen - len(pairs)
    if skipped:
        logging.getLogger("llama_jax.data").warning(
            "%s: %d of %d preference records skipped.", name, skipped, seen
        )
    return pairs


def load_prompts(paths: Sequence[str], name: str = "") -> list[dict]:
    """[{"id", "messages", "record"}] of every usable prompt record (`record`: the line as read);
    `id` defaults to "FILE:LINE"."""
    name = name or paths[0]
    prompts, seen = [], 0
    for where, record in read_jsonl(paths, name):
        seen += 1
        try:
            messages = prompt_messages(record)
        except BadRecord as err:
            COUNTERS.add(name, SKIPPED, f": {where}: {err}")
            continue
        prompts.append({"id": str(record.get("id", where)), "messages": messages, "record": record})
    if not prompts:
        raise ValueError(f"{name} has no usable prompts ({seen} records)")
    return prompts


# --- batches -----------------------------------------------------------------------------------


def split_holdout(items: list, fraction: float, seed: int) -> tuple[list, list]:
    """(train, held out): a seeded `fraction` of the items (at least one, if fraction > 0)."""
    if fraction <= 0:
        return items, []
    if len(items) < 2:
        raise ValueError("Holding out an evaluation split needs at least 2 pairs")
    order = np.random.default_rng(seed).permutation(len(items))
    n_eval = min(len(items) - 1, max(1, round(fraction * len(items))))
    held = set(order[:n_eval].tolist())
    return ([x for i, x in enumerate(items) if i not in held], [items[i] for i in sorted(held)])


def pad_pair(pair: dict, seq_len: int) -> dict[str, np.ndarray]:
    """A pair as fixed-length rows: tokens, segment_ids (1 on the sequence, 0 on padding) and the
    masks of each side [seq_len]; scalars (margin, reference log-probs) stay scalars, and `weight`
    is 1 (0 for the filler that completes an evaluation batch, see `fill_to_multiple`)."""
    row: dict[str, np.ndarray] = {"weight": np.float32(1.0)}
    for side in PAIR_SIDES:
        length = len(pair[f"{side}_tokens"])
        for key, dtype in (("tokens", np.int32), ("loss_mask", np.float32), ("response_mask", np.float32)):
            padded = np.zeros(seq_len, dtype)
            padded[:length] = pair[f"{side}_{key}"]
            row[f"{side}_{key}"] = padded
        row[f"{side}_segment_ids"] = (np.arange(seq_len) < length).astype(np.int32)
    for key, value in pair.items():
        if np.ndim(value) == 0:
            row[key] = np.float32(value)
    return row


def fill_to_multiple(pairs: list[dict], multiple: int) -> list[dict]:
    """`pairs` and copies of the first with weight 0 up to a multiple of `multiple`, so that an
    evaluation covers every pair in whole batches and counts each exactly once."""
    filler = {**pairs[0], "weight": np.float32(0.0)}
    return pairs + [filler] * (-len(pairs) % multiple)


def pair_batches(
    pairs: list[dict],
    *,
    seq_len: int,
    batch_size: int,
    seed: int,
    shuffle: bool = True,
    num_epochs: int | None = None,
    process_index: int = 0,
    process_count: int = 1,
    drop_remainder: bool = True,
):
    """A checkpointable Grain iterator over batches of `batch_size` pairs (this process's share),
    reshuffled every epoch; arrays [batch_size, seq_len] and [batch_size]."""
    import grain

    if len(pairs) < process_count:
        raise ValueError(f"{len(pairs)} pairs cannot be shared by {process_count} processes")
    ds = grain.MapDataset.source(pairs)[process_index::process_count]
    if shuffle:
        ds = _shuffle(ds, seed)  # the pretraining pipeline's: a new order every epoch
    ds = ds.repeat(num_epochs).map(lambda pair: pad_pair(pair, seq_len))
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    return iter(ds.to_iter_dataset())
