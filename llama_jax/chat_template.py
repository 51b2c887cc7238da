"""Chat formats as token ids plus an assistant mask.

* "llama2" and "llama3": Meta's formats, following Meta's reference code token for token.
* "hf": the tokenizer's own Jinja `chat_template` (tokenizer_config.json or chat_template.jinja),
  rendered and tokenized as transformers' `apply_chat_template` does.

The mask is 1 on the tokens of assistant replies, including the token that
ends the reply (`<|eot_id|>` or `<|eom_id|>` for Llama 3, EOS `</s>` for Llama 2), so a
model fine-tuned on it learns to stop; headers, prompts and BOS are 0. For "hf" it is 1 on the
tokens inside the template's `{% generation %}` blocks (all 0 if it has none, as in transformers).

Llama 3.1 tool calls (the "llama3" format, with Meta's ChatFormat semantics):

* A tool call is an assistant message whose content starts with `<|python_tag|>`, as the model
  writes it, e.g. `{"role": "assistant", "content": "<|python_tag|>brave_search.call(query=...)"}`.
  It is encoded as the `<|python_tag|>` token, the rest of the content as text, and `<|eom_id|>`
  (end of message: the model waits for the tool's result) instead of `<|eot_id|>`.
* The tool's result is a message of role "tool" (Meta's name; its header says "ipython", as
  Meta's ChatFormat writes it) or "ipython".
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import secrets
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from llama_jax.tokenizer import special_token_text

if TYPE_CHECKING:
    from llama_jax.tokenizer import Tokenizer

Message = Mapping[str, Any]  # {"role": ..., "content": ...}

LLAMA2_INST = ("[INST]", "[/INST]")
# The roles each format knows (Meta's reference code; Llama 3.1 adds "ipython" for tool output,
# which Meta's ChatFormat also accepts as "tool").
ROLES = {
    "llama2": ("system", "user", "assistant"),
    "llama3": ("system", "user", "assistant", "ipython", "tool"),
}
LLAMA2_SYS = ("<<SYS>>\n", "\n<</SYS>>\n\n")
PYTHON_TAG = "<|python_tag|>"
# The tokenizer_config.json entries transformers hands a chat template (its special_tokens_map).
HF_TEMPLATE_TOKENS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)


class ChatTemplateError(ValueError):
    """A dialog or chat template that cannot be encoded; the message is one sentence."""


@dataclasses.dataclass(frozen=True)
class ChatTokens:
    ids: list[int]
    # 1 where ids[i] belongs to an assistant reply, else 0; same length as ids.
    assistant_mask: list[int]


def trained_reply(message: Message) -> int:
    """1 for an assistant message the loss counts, 0 for any other: an assistant message with
    `"weight": 0` (OpenAI's fine-tuning format) is context only, as Ghost Attention's earlier
    turns are."""
    return int(message["role"] == "assistant" and message.get("weight", 1) == 1)


def _check_messages(messages: Sequence[Message], template: str) -> None:
    if not messages:
        raise ChatTemplateError("A dialog needs at least one message.")
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ChatTemplateError(f"Message {i} is not a dict with 'role' and 'content'.")
        for key in ("role", "content"):
            if not isinstance(message.get(key), str):
                raise ChatTemplateError(f"Message {i} lacks a string '{key}'.")
        if message["role"] not in ROLES[template]:
            raise ChatTemplateError(
                f"Message {i} has the unknown role {message['role']!r}; the "
                f"{template} format knows {', '.join(ROLES[template])}."
            )
        if "weight" in message and message["weight"] not in (0, 1):
            raise ChatTemplateError(
                f"Message {i} has weight {message['weight']!r}; a weight is 0 (not trained on) or 1."
            )
        if message.get("tool_calls"):
            raise ChatTemplateError(
                f"Message {i} has 'tool_calls', which the {template} format does not read; write a tool "
                f"call as assistant content starting with {PYTHON_TAG}, or use the 'hf' template."
            )


def encode_llama3_chat(
    tokenizer: Tokenizer,
    messages: Sequence[Message],
    *,
    add_generation_prompt: bool = False,
) -> ChatTokens:
    """`<|begin_of_text|>` then, per message, header + stripped content + `<|eot_id|>`.

    A "tool" message gets the header "ipython". An assistant tool call (content starting with
    `<|python_tag|>`) is that token + the rest as text + `<|eom_id|>`. Special-token text anywhere
    else in the content is encoded as text. With `add_generation_prompt`, ends with an empty
    assistant header for the model to complete.
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
        role = "ipython" if role == "tool" else role
        add([start_header] + tokenizer.encode(role) + [end_header] + newlines, 0)

    for message in messages:
        add_header(message["role"])
        content = message["content"].strip()
        trained = trained_reply(message)
        if message["role"] == "assistant" and content.startswith(PYTHON_TAG):
            call = tokenizer.encode(content[len(PYTHON_TAG) :])
            add([tokenizer.token_id(PYTHON_TAG)] + call + [tokenizer.token_id("<|eom_id|>")], trained)
        else:
            add(tokenizer.encode(content) + [eot], trained)
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
            raise ChatTemplateError("A Llama 2 system message must be followed by a user one.")
        system, first = messages[0], messages[1]
        merged = LLAMA2_SYS[0] + system["content"] + LLAMA2_SYS[1] + first["content"]
        messages = [{"role": first["role"], "content": merged}] + messages[2:]
    roles = [m["role"] for m in messages]
    expected = ["user", "assistant"] * ((len(roles) + 1) // 2)
    if roles != expected[: len(roles)]:
        raise ChatTemplateError(
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
        trained = trained_reply(messages[i + 1])
        mask += [0] + [int(s >= len(prompt)) * trained for s in starts] + [trained]
    return ChatTokens(ids, mask)


# --------------------------------------------------------------------------
# A tokenizer's own Jinja chat template, as transformers renders it.

# Markers around the output of each {% generation %} block: NUL and digits, which no filter changes
# and no dialog holds by chance (the digits are random per process).
_NONCE = "".join(secrets.choice("0123456789") for _ in range(16))
_GENERATION_START, _GENERATION_END = f"\x00{_NONCE}1\x00", f"\x00{_NONCE}2\x00"


@functools.lru_cache(maxsize=8)
def _compile_hf_template(template: str):
    """The template in an environment set up as transformers sets up its own: sandboxed and
    immutable, trim_blocks and lstrip_blocks, loop controls, a `{% generation %}` tag, a `tojson`
    that keeps non-ASCII and HTML characters, and the globals raise_exception and strftime_now
    (with `dict` and `namespace` that cannot reach private attributes)."""
    import jinja2
    import jinja2.ext
    import jinja2.sandbox
    import jinja2.utils

    class GenerationBlocks(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}`: marks what it renders as the assistant's."""

        tags = {"generation"}

        def parse(self, parser):
            line = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_mark"), [], [], body).set_lineno(line)

        def _mark(self, caller):
            return _GENERATION_START + caller() + _GENERATION_END

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(
            value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    class Namespace(jinja2.utils.Namespace):
        def __init__(*args, **kwargs):  # noqa: N805 - jinja's own signature, so that any key name works
            self, attrs = args[0], dict(*args[1:], **kwargs)
            for name in attrs:
                Namespace._refuse_private(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            Namespace._refuse_private(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _refuse_private(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"A chat template may not set {name!r} on a namespace.")

    class DictMaker:
        """`dict(...)` and `dict.fromkeys(...)` without handing templates the type itself."""

        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    environment = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationBlocks, jinja2.ext.loopcontrols]
    )
    environment.filters["tojson"] = tojson
    environment.globals.update(
        raise_exception=raise_exception,
        strftime_now=lambda format: datetime.datetime.now().strftime(format),
        dict=DictMaker(),
        namespace=Namespace,
    )
    return environment.from_string(template)


def render_hf_template(
    template: str,
    messages: Sequence[Message],
    *,
    add_generation_prompt: bool = False,
    special_tokens: Mapping[str, str] | None = None,
) -> tuple[str, list[tuple[int, int]]]:
    """The text transformers' apply_chat_template renders (`messages` without None-valued keys,
    tools and documents None, then `special_tokens`, e.g. bos_token) and the [start, end) spans of
    the text that `{% generation %}` blocks rendered."""
    import jinja2

    plain_messages = [{key: value for key, value in m.items() if value is not None} for m in messages]
    try:
        text = _compile_hf_template(template).render(
            messages=plain_messages,
            tools=None,
            documents=None,
            add_generation_prompt=add_generation_prompt,
            **(special_tokens or {}),
        )
    except jinja2.TemplateError as e:  # raise_exception's messages among them
        raise ChatTemplateError(f"The chat template failed: {e}") from None
    except Exception as e:  # a template is code: e.g. 'a' + 1 raises TypeError
        raise ChatTemplateError(f"The chat template failed: {type(e).__name__}: {e}") from None
    spans = []
    pieces = text.split(_GENERATION_START)
    plain = pieces[0]
    for piece in pieces[1:]:
        inside, end, after = piece.partition(_GENERATION_END)
        if not end or _GENERATION_END in after:
            raise ChatTemplateError("The chat template's {% generation %} blocks are nested or cut apart.")
        spans.append((len(plain), len(plain) + len(inside)))
        plain += inside + after
    return plain, spans


def hf_template_special_tokens(tokenizer: Tokenizer) -> dict[str, str]:
    """The special-token variables a chat template sees: tokenizer_config.json's bos_token,
    eos_token etc., with bos_token and eos_token from the tokenizer where the config has none."""
    config = tokenizer.tokenizer_config
    tokens = {name: special_token_text(config.get(name)) for name in HF_TEMPLATE_TOKENS}
    text_of = {i: text for text, i in tokenizer.special_tokens.items()}
    tokens["bos_token"] = tokens["bos_token"] or text_of.get(tokenizer.bos_id)
    tokens["eos_token"] = tokens["eos_token"] or text_of.get(tokenizer.eos_id)
    return {name: text for name, text in tokens.items() if text is not None}


def encode_hf_chat(
    tokenizer: Tokenizer,
    messages: Sequence[Message],
    *,
    add_generation_prompt: bool = False,
) -> ChatTokens:
    """The tokenizer's own chat template, rendered and encoded as transformers' apply_chat_template
    does: special-token text in the rendered chat (the template's and the messages') becomes special
    tokens. Messages are passed to the template as they are (any roles and keys, e.g. tool_calls).
    The mask is 1 on tokens that overlap `{% generation %}` blocks."""
    if not messages or not all(isinstance(m, Mapping) and isinstance(m.get("role"), str) for m in messages):
        raise ChatTemplateError("A dialog is a non-empty list of dicts, each with a string 'role'.")
    if any(m.get("weight", 1) != 1 for m in messages):
        raise ChatTemplateError(
            "Per-message weights need the llama2 or llama3 template, not the tokenizer's own."
        )
    text, spans = render_hf_template(
        _own_template(tokenizer),
        messages,
        add_generation_prompt=add_generation_prompt,
        special_tokens=hf_template_special_tokens(tokenizer),
    )
    ids, starts = tokenizer.encode_with_offsets(text, allowed_special="all")
    # A token covers the text from its start to the next token's (at least one character, for
    # tokens that share a character); it is the assistant's if that overlaps a generation span.
    ends = [max(following, start + 1) for start, following in zip(starts, starts[1:] + [len(text)])]
    mask = [
        int(any(start < span_end and end > span_start for span_start, span_end in spans))
        for start, end in zip(starts, ends)
    ]
    return ChatTokens(ids, mask)


def _own_template(tokenizer: Tokenizer) -> str:
    if tokenizer.chat_template is None:
        raise ChatTemplateError(
            f"The tokenizer {tokenizer.path} has no chat template "
            "(tokenizer_config.json's chat_template or chat_template.jinja beside it)."
        )
    return tokenizer.chat_template


TEMPLATES = {"llama2": encode_llama2_chat, "llama3": encode_llama3_chat, "hf": encode_hf_chat}


def check_template(tokenizer: Tokenizer, template: str | None) -> str:
    """The template's name (None: the tokenizer family's), checked to be one this tokenizer can use."""
    template = template or default_template(tokenizer)
    if template not in TEMPLATES:
        raise ChatTemplateError(f"Unknown chat template {template!r}; use one of {sorted(TEMPLATES)}.")
    if template == "hf":
        _own_template(tokenizer)
    return template


def encode_chat(
    tokenizer: Tokenizer,
    messages: Sequence[Message],
    *,
    template: str | None = None,
    add_generation_prompt: bool = False,
) -> ChatTokens:
    """Token ids of a dialog with the named template ("llama2", "llama3" or "hf"; None: the one
    the tokenizer's family was trained on) and which of them are assistant replies."""
    template = check_template(tokenizer, template)
    return TEMPLATES[template](tokenizer, messages, add_generation_prompt=add_generation_prompt)


def default_template(tokenizer: Tokenizer) -> str:
    """The chat format of the tokenizer's family: "llama2" or "llama3" (never "hf": Meta's formats
    are the default, a tokenizer's own template is used only when asked for)."""
    return tokenizer.family


# --------------------------------------------------------------------------
# Keeping the exact ids of earlier turns (the chat CLI).


def next_turn_prompt(
    tokenizer: Tokenizer,
    messages: Sequence[Message],
    kept_ids: Sequence[int],
    *,
    template: str | None = None,
) -> list[int]:
    """The prompt for the reply to `messages[-1]`: `kept_ids`, the exact ids of `messages[:-1]`
    (e.g. replies as the model produced them, special tokens and all), then the ids the template
    gives the last message and the generation prompt. Those are the difference between the
    template's encodings of the dialog with and without the last message; with no kept ids, the
    whole dialog as the template encodes it."""
    whole = encode_chat(tokenizer, messages, template=template, add_generation_prompt=True).ids
    if not kept_ids:
        return whole
    earlier = encode_chat(tokenizer, messages[:-1], template=template).ids
    if whole[: len(earlier)] != earlier:
        raise ChatTemplateError(
            "The chat template encodes earlier messages differently once another follows, "
            "so their token ids cannot be kept."
        )
    return list(kept_ids) + whole[len(earlier) :]


def close_reply(
    tokenizer: Tokenizer,
    messages: Sequence[Message],
    reply_ids: Sequence[int],
    *,
    template: str | None = None,
) -> list[int]:
    """The reply's ids as the model produced them, kept for later turns; `messages` ends with the
    reply as text. A reply cut off before a stop token gets the token the template ends a reply
    with (the last token of the dialog it encodes: `<|eot_id|>`, `<|eom_id|>`, `</s>`)."""
    if reply_ids and reply_ids[-1] in tokenizer.stop_ids:
        return list(reply_ids)
    return list(reply_ids) + encode_chat(tokenizer, messages, template=template).ids[-1:]
