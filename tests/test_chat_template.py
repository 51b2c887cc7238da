"""Chat templates: a tokenizer's own Jinja template against transformers' apply_chat_template, Llama
3.1 tool calls against Meta's ChatFormat, and keeping the exact ids of earlier turns."""

from pathlib import Path

import jinja2
import pytest
import transformers
from llama_models.datatypes import BuiltinTool, RawMessage, StopReason, ToolCall
from llama_models.llama3.chat_format import ChatFormat
from llama_models.llama3.tokenizer import Tokenizer as MetaTokenizer
from test_tokenizer import META_LLAMA3_FILE, write_llama3_download

from llama_jax.chat_template import ChatTemplateError, close_reply, encode_chat, next_turn_prompt
from llama_jax.data import synthetic
from llama_jax.tokenizer import TiktokenTokenizer, load_tokenizer

TOOLS_TEMPLATE = (Path(__file__).parent / "data" / "llama3_tools_chat_template.jinja").read_text()

# A tool call and its result in the Hugging Face convention (tool_calls, role "tool"), non-ASCII
# text for tojson, None values that transformers drops, a dict content, stray whitespace.
HF_DIALOG = [
    {"role": "system", "content": " Be brief. "},
    {"role": "user", "content": "Weather in Zürich? <|eot_id|>"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"type": "function", "function": {"name": "weather", "arguments": {"city": "Zürich", "days": 2}}}
        ],
    },
    {"role": "tool", "content": {"temp": 21, "sky": "clear"}},
    {"role": "assistant", "content": "It is 21 degrees. "},
    {"role": "user", "content": "Thanks"},
]


@pytest.fixture(scope="module")
def download(tmp_path_factory):
    """A small Llama 3 style download whose chat_template.jinja (which transformers prefers to
    tokenizer_config.json's) is the test template; (our tokenizer, transformers')."""
    root = tmp_path_factory.mktemp("download")
    tiktoken_file = synthetic.write_tiktoken_model(str(root / "source"))
    directory = write_llama3_download(
        root / "hf", tiktoken_file, chat_template="{{ raise_exception('not me') }}"
    )
    (directory / "chat_template.jinja").write_text(TOOLS_TEMPLATE)
    return load_tokenizer(directory), transformers.AutoTokenizer.from_pretrained(directory)


@pytest.fixture(scope="module")
def meta_tokenizers():
    return TiktokenTokenizer(META_LLAMA3_FILE), MetaTokenizer(Path(META_LLAMA3_FILE))


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_hf_template_as_transformers(download, add_generation_prompt):
    tok, reference = download
    chat = encode_chat(tok, HF_DIALOG, template="hf", add_generation_prompt=add_generation_prompt)
    expected = reference.apply_chat_template(
        HF_DIALOG,
        add_generation_prompt=add_generation_prompt,
        return_assistant_tokens_mask=True,
        return_dict=True,
    )
    assert chat.ids == expected["input_ids"]
    assert chat.assistant_mask == expected["assistant_masks"]
    # The generation blocks: the tool call and the answer, each with the token that ends it.
    replies = tok.decode([i for i, m in zip(chat.ids, chat.assistant_mask) if m])
    assert replies == '<|python_tag|>weather.call(city="Zürich", days=2)<|eom_id|>It is 21 degrees.<|eot_id|>'
    # As transformers does by default, special-token text in the messages becomes special tokens.
    assert chat.ids.count(tok.token_id("<|eot_id|>")) == 6  # five turns ended, one in the user text
    # Meta's built-in formats stay the default.
    default = encode_chat(tok, [{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert default == encode_chat(
        tok, [{"role": "user", "content": "hi"}], template="llama3", add_generation_prompt=True
    )


def test_hf_template_errors(download, tt_tokenizer_file):
    tok, reference = download
    dialog = [{"role": "narrator", "content": "Once"}]
    with pytest.raises(jinja2.TemplateError, match="Unknown role narrator"):
        reference.apply_chat_template(dialog)
    with pytest.raises(
        ChatTemplateError, match=r"^The chat template failed: Unknown role narrator: [^\n]*\.$"
    ):
        encode_chat(tok, dialog, template="hf")
    with pytest.raises(ChatTemplateError, match="has no chat template"):
        encode_chat(load_tokenizer(tt_tokenizer_file), [{"role": "user", "content": "hi"}], template="hf")
    with pytest.raises(ChatTemplateError, match="Unknown chat template"):
        encode_chat(tok, dialog, template="chatml")


@pytest.fixture(scope="module")
def tt_tokenizer_file(tmp_path_factory):
    return synthetic.write_tiktoken_model(str(tmp_path_factory.mktemp("bare")))


def test_llama31_tool_calls_as_meta(meta_tokenizers):
    tok, meta = meta_tokenizers
    code = "print(weather('Paris'))"
    meta_dialog = [
        RawMessage(role="system", content="Environment: ipython"),
        RawMessage(role="user", content="Weather in Paris?"),
        RawMessage(
            role="assistant",
            content="",
            stop_reason=StopReason.end_of_message,
            tool_calls=[
                ToolCall(call_id="1", tool_name=BuiltinTool.code_interpreter, arguments={"code": code})
            ],
        ),
        RawMessage(role="tool", content='{"temp": 21} <|eot_id|>'),
        RawMessage(role="assistant", content="It is 21 degrees.", stop_reason=StopReason.end_of_turn),
        RawMessage(role="user", content="Thanks"),
    ]
    dialog = [
        {"role": "system", "content": "Environment: ipython"},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "<|python_tag|>" + code},
        {"role": "tool", "content": '{"temp": 21} <|eot_id|>'},
        {"role": "assistant", "content": "It is 21 degrees."},
        {"role": "user", "content": "Thanks"},
    ]
    expected = ChatFormat(meta).encode_dialog_prompt(meta_dialog).tokens
    chat = encode_chat(tok, dialog, add_generation_prompt=True)
    assert chat.ids == expected
    ipython = [dict(m, role="ipython") if m["role"] == "tool" else m for m in dialog]
    assert encode_chat(tok, ipython, add_generation_prompt=True).ids == expected
    replies = [i for i, m in zip(chat.ids, chat.assistant_mask) if m]
    assert tok.decode(replies) == f"<|python_tag|>{code}<|eom_id|>It is 21 degrees.<|eot_id|>"
    with pytest.raises(ChatTemplateError, match="tool_calls"):
        encode_chat(tok, [{"role": "assistant", "content": "", "tool_calls": [{"name": "f"}]}])


@pytest.fixture(scope="module")
def sp_tokenizer(tmp_path_factory):
    return load_tokenizer(synthetic.write_sentencepiece_model(str(tmp_path_factory.mktemp("sp"))))


DIALOG = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "hello there"},
    {"role": "user", "content": "bye"},
]


@pytest.mark.parametrize("template", ["llama2", "llama3", "hf"])
def test_next_turn_prompt_keeps_ids(template, meta_tokenizers, sp_tokenizer, download):
    tok = {"llama2": sp_tokenizer, "llama3": meta_tokenizers[0], "hf": download[0]}[template]
    # Kept ids the same as the template's: the prompt is the template's.
    earlier = encode_chat(tok, DIALOG[:-1], template=template).ids
    whole = encode_chat(tok, DIALOG, template=template, add_generation_prompt=True).ids
    assert next_turn_prompt(tok, DIALOG, earlier, template=template) == whole
    # Kept ids that differ from the template's (e.g. a reply as the model spelled it) stay as they are.
    kept = earlier[:3] + [tok.encode(ch)[0] for ch in "hello there"] + earlier[-1:]
    assert next_turn_prompt(tok, DIALOG, kept, template=template) == kept + whole[len(earlier) :]
    # No kept ids: the whole dialog.
    assert (
        next_turn_prompt(tok, DIALOG[:2], [], template=template)
        == encode_chat(tok, DIALOG[:2], template=template, add_generation_prompt=True).ids
    )


def test_close_reply(meta_tokenizers, sp_tokenizer):
    tok = meta_tokenizers[0]
    eot, eom, tag = (tok.token_id(t) for t in ("<|eot_id|>", "<|eom_id|>", "<|python_tag|>"))
    done = tok.encode("hello") + [eom]  # ended by the model: kept as it is, stop token and all
    assert close_reply(tok, DIALOG[:3], done) == done
    cut = tok.encode("hello")  # cut off at the token limit: closed as the template closes a reply
    assert close_reply(tok, DIALOG[:3], cut) == cut + [eot]
    call = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "<|python_tag|>f()"}]
    assert close_reply(tok, call, [tag] + tok.encode("f()")) == [tag] + tok.encode("f()") + [eom]
    assert close_reply(sp_tokenizer, DIALOG[:3], [5, 6]) == [5, 6, sp_tokenizer.eos_id]


@pytest.mark.parametrize("template", ["llama2", "llama3"])
def test_an_assistant_message_of_weight_0_is_context_only(template, meta_tokenizers, sp_tokenizer):
    """OpenAI's per-message "weight": 0 keeps a reply in the dialog (the same ids) but out of the
    loss mask; the other replies keep theirs (Ghost Attention trains on its last turn only)."""
    tok = meta_tokenizers[0] if template == "llama3" else sp_tokenizer
    dialog = DIALOG[:3] + [
        {"role": "user", "content": "more"},
        {"role": "assistant", "content": "sure thing"},
    ]
    full = encode_chat(tok, dialog, template=template)
    weighted = [dict(m, weight=0) if i == 2 else m for i, m in enumerate(dialog)]
    masked = encode_chat(tok, weighted, template=template)
    assert masked.ids == full.ids
    first_reply_end = encode_chat(tok, dialog[:3], template=template).ids
    cut = len(first_reply_end)
    assert sum(full.assistant_mask[:cut]) > 0 and sum(masked.assistant_mask[:cut]) == 0
    assert masked.assistant_mask[cut:] == full.assistant_mask[cut:] and sum(masked.assistant_mask) > 0
    with pytest.raises(ChatTemplateError, match="a weight is 0 .* or 1"):
        encode_chat(
            tok, [dict(m, weight=0.5) if i == 2 else m for i, m in enumerate(dialog)], template=template
        )
