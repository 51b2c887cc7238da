"""Llama 2 and Llama 3 chat formats as token ids plus an assistant mask.

The mask is 1 on the tokens of assistant replies, including the token that
ends the reply (`<|eot_id|>` for Llama 3, EOS `</s>` for Llama 2), so a
model fine-tuned on it learns to stop; headers, prompts and BOS are 0.

Both follow Meta's reference `chat_completion` code token for token.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from llama_jax.tokenizer import Tokenizer

Message = Mapping[str, str]  # {"role": ..., "content": ...}

LLAMA2_INST = ("[INST]", "[/INST]")
# The roles each format knows (Meta's reference code; Llama 3.1 adds "ipython" for tool output).
ROLES = {"llama2": ("system", "user", "assistant"), "llama3": ("system", "user", "assistant", "ipython")}
LLAMA2_SYS = ("<<SYS>>\n", "\n<</SYS>>\n\n")


@dataclasses.dataclass(frozen=True)
class ChatTokens:
    ids: list[int]
    # 1 where ids[i] belongs to an assistant reply, else 0; same length as ids.
    assistant_mask: list[int]


def _check_messages(messages: Sequence[Message], template: str) -> None:
    if not messages:
        raise ValueError("A dialog needs at least one message.")
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ValueError(f"Message {i} is not a dict with 'role' and 'content'.")
        for key in ("role", "content"):
            if not isinstance(message.get(key), str):
                raise ValueError(f"Message {i} lacks a string '{key}'.")
        if message["role"] not in ROLES[template]:
            raise ValueError(
                f"Message {i} has the unknown role {message['role']!r}; the "
                f"{template} format knows {', '.join(ROLES[template])}."
            )


def encode_llama3_chat(
    tokenizer: Tokenizer,
    messages: Sequence[Message],
    *,
    add_generation_prompt: bool = False,
) -> ChatTokens:
    """`<|begin_of_text|>` then, per message, header + stripped content + eot.

    With `add_generation_prompt`, ends with an empty assistant header for the
    model to complete.
    """
    _check_messages(messages, "llama3")
    start_header = tokenizer.token_id("<|start_header_id|>")
    end_header = tokenizer.token_id("<|end_header_id|>")
    eot = tokenizer.token_id("<|eot_id|>")
    newlines = tokenizer.encode("\n\n")

    ids = [tokenizer.bos_id]
    mask = [0]

    def add(new_ids: list[int], value: int) -> None:
        ids.extend(new_ids)
        mask.extend([value] * len(new_ids))

    def add_header(role: str) -> None:
        add([start_header] + tokenizer.encode(role) + [end_header] + newlines, 0)

    for message in messages:
        add_header(message["role"])
        is_reply = int(message["role"] == "assistant")
        add(tokenizer.encode(message["content"].strip()) + [eot], is_reply)
    if add_generation_prompt:
        add_header("assistant")
    return ChatTokens(ids, mask)


def encode_llama2_chat(
    tokenizer: Tokenizer,
    messages: Sequence[Message],
    *,
    add_generation_prompt: bool = False,
) -> ChatTokens:
    """`<s>[INST] {user} [/INST] {answer} </s>` per turn, as Meta's llama 2.

    An optional leading system message is wrapped in `<<SYS>>` into the first
    user message. A dialog that ends with a user message ends with
    `<s>[INST] {user} [/INST]`, the prompt for the reply, whatever
    `add_generation_prompt` says (Llama 2 has no separate reply header).
    """
    del add_generation_prompt
    _check_messages(messages, "llama2")
    messages = list(messages)
    if messages[0]["role"] == "system":
        if len(messages) < 2:
            raise ValueError("A Llama 2 system message must be followed by a user one.")
        system, first = messages[0], messages[1]
        merged = LLAMA2_SYS[0] + system["content"] + LLAMA2_SYS[1] + first["content"]
        messages = [{"role": first["role"], "content": merged}] + messages[2:]
    roles = [m["role"] for m in messages]
    expected = ["user", "assistant"] * ((len(roles) + 1) // 2)
    if roles != expected[: len(roles)]:
        raise ValueError(
            "Llama 2 dialogs alternate user and assistant, starting with user "
            f"(after an optional system message); got roles {roles}."
        )
    begin, end = LLAMA2_INST
    ids: list[int] = []
    mask: list[int] = []
    for i in range(0, len(messages), 2):
        prompt = f"{begin} {messages[i]['content'].strip()} {end}"
        if i + 1 == len(messages):
            turn_ids = tokenizer.encode(prompt)
            ids += [tokenizer.bos_id] + turn_ids
            mask += [0] * (1 + len(turn_ids))
            break
        answer = messages[i + 1]["content"].strip()
        # Encoded as one string, as Meta does; tokens starting at or after the
        # space before the answer belong to the answer.
        turn_ids, starts = tokenizer.encode_with_offsets(f"{prompt} {answer} ")
        ids += [tokenizer.bos_id] + turn_ids + [tokenizer.eos_id]
        mask += [0] + [int(s >= len(prompt)) for s in starts] + [1]
    return ChatTokens(ids, mask)


TEMPLATES = {"llama2": encode_llama2_chat, "llama3": encode_llama3_chat}


def encode_chat(
    tokenizer: Tokenizer,
    messages: Sequence[Message],
    *,
    template: str | None = None,
    add_generation_prompt: bool = False,
) -> ChatTokens:
    """Token ids of a dialog with the named template ("llama2" or "llama3"; None: the one the
    tokenizer's family was trained on) and which of them are assistant replies."""
    template = template or default_template(tokenizer)
    if template not in TEMPLATES:
        raise ValueError(f"Unknown chat template {template!r}; use one of {sorted(TEMPLATES)}.")
    return TEMPLATES[template](tokenizer, messages, add_generation_prompt=add_generation_prompt)


def default_template(tokenizer: Tokenizer) -> str:
    """The chat format of the tokenizer's family: "llama2" (SentencePiece) or "llama3" (tiktoken)."""
    return tokenizer.family
