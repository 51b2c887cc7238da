"""`python -m llama_jax.generate`: streamed text equals the decoded generation; chat, which feeds
earlier turns back token for token; Hugging Face downloads; errors."""

import io
import shutil

import jax
import numpy as np
import pytest
from test_tokenizer import write_llama3_download

from llama_jax import generate as generate_lib
from llama_jax.chat_template import encode_chat
from llama_jax.checkpoint import save_params
from llama_jax.config import ModelConfig, SamplingConfig
from llama_jax.data.synthetic import write_sentencepiece_model, write_tiktoken_model
from llama_jax.model import init_params
from llama_jax.tokenizer import HuggingFaceTokenizer, TiktokenTokenizer, load_tokenizer

CFG = ModelConfig(
    dim=64,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    head_dim=16,
    ffn_dim=128,
    vocab_size=320,
    max_seq_len=96,
    init_std=0.3,
)


@pytest.fixture(scope="module")
def model_and_tokenizer(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    params = init_params(CFG, jax.random.key(0))
    save_params(root / "ckpt", params, CFG)
    return root / "ckpt", write_sentencepiece_model(str(root / "tok"), vocab_size=320), params


def test_prompt_streams_the_generated_text(model_and_tokenizer, capsys):
    ckpt, tokenizer_path, params = model_and_tokenizer
    assert (
        generate_lib.main(
            [
                "--ckpt",
                str(ckpt),
                "--tokenizer",
                tokenizer_path,
                "--prompt",
                "the cat",
                "--max-new-tokens",
                "12",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    tokenizer = load_tokenizer(tokenizer_path)
    expected = generate_lib.generate(
        params,
        CFG,
        [tokenizer.encode("the cat", bos=True)],
        SamplingConfig(12),
        stop_tokens=tokenizer.stop_ids,
    )[0]
    expected_text = tokenizer.decode([t for t in expected if t not in tokenizer.stop_ids])
    assert out == "the cat" + expected_text + "\n"


def _record_generate(monkeypatch, replies=None):
    """Records the prompts `generate` gets; answers with `replies` (streamed as generate streams)
    or, without them, with the real model's replies. Returns (prompts, replies)."""
    prompts, answered, real_generate = [], [], generate_lib.generate

    def recording_generate(params, cfg, batch, sampling, **kwargs):
        prompts.append(list(batch[0]))
        if replies is None:
            reply = real_generate(params, cfg, batch, sampling, **kwargs)[0]
        else:
            reply = replies[len(prompts) - 1]
            for step, token in enumerate(reply):
                kwargs["on_token"](step, np.array([token]))
        answered.append(reply)
        return [reply]

    monkeypatch.setattr(generate_lib, "generate", recording_generate)
    return prompts, answered


def test_chat_answers_in_the_template(model_and_tokenizer, capsys, monkeypatch):
    ckpt, tokenizer_path, _ = model_and_tokenizer
    tok = load_tokenizer(tokenizer_path)
    prompts, replies = _record_generate(monkeypatch)
    monkeypatch.setattr("sys.stdin", io.StringIO("hello there\nand again\n"))
    assert (
        generate_lib.main(
            ["--ckpt", str(ckpt), "--tokenizer", tokenizer_path, "--chat", "--max-new-tokens", "6"]
        )
        == 0
    )
    captured = capsys.readouterr()
    assert captured.out.startswith("> ") and len(captured.out.strip()) > 2
    assert "Chat; end with Ctrl-D." in captured.err
    # Llama 2's format; the second prompt is the first one and the model's reply as it was produced
    # (closed with </s> if the token limit cut it off), then the new turn.
    assert prompts[0] == encode_chat(tok, [{"role": "user", "content": "hello there"}]).ids
    closing = [] if replies[0][-1] == tok.eos_id else [tok.eos_id]
    new_turn = encode_chat(tok, [{"role": "user", "content": "and again"}]).ids
    assert prompts[1] == prompts[0] + replies[0] + closing + new_turn


@pytest.fixture(scope="module")
def llama3_tokenizer_path(tmp_path_factory):
    """A small tiktoken tokenizer (300 ranks) with Llama 3's 256 special tokens."""
    return write_tiktoken_model(str(tmp_path_factory.mktemp("gen3")), 300)


def test_chat_feeds_back_the_reply_ids(llama3_tokenizer_path, capsys, monkeypatch):
    tok = load_tokenizer(llama3_tokenizer_path)
    # The replies are scripted, so no model is needed.
    monkeypatch.setattr(generate_lib, "load_model", lambda ckpt, hf, path: (CFG, None, load_tokenizer(path)))
    tag, eom, eot = (tok.token_id(t) for t in ("<|python_tag|>", "<|eom_id|>", "<|eot_id|>"))
    # A tool call spelled one character per token (its text re-encodes differently) and ended with
    # <|eom_id|>, then a reply cut off at the token limit, then a plain one.
    spelled = [tok.encode(ch)[0] for ch in "the"]
    assert tok.encode("the") != spelled
    replies = [[tag] + spelled + [eom], spelled, tok.encode("ok") + [eot]]
    prompts, _ = _record_generate(monkeypatch, replies)
    monkeypatch.setattr("sys.stdin", io.StringIO("weather?\n21 degrees\nthanks\n"))
    args = ["--ckpt", "unused", "--tokenizer", llama3_tokenizer_path, "--chat", "--system", "Use tools."]
    assert generate_lib.main(args) == 0

    def new_turn(text):  # a user message and the reply's header, as Meta's format writes them
        return encode_chat(tok, [{"role": "user", "content": text}], add_generation_prompt=True).ids[1:]

    system = encode_chat(tok, [{"role": "system", "content": "Use tools."}]).ids
    assert prompts[0] == system + new_turn("weather?")
    assert prompts[1] == prompts[0] + replies[0] + new_turn("21 degrees")
    assert prompts[2] == prompts[1] + replies[1] + [eot] + new_turn("thanks")
    assert "<|python_tag|>the" in capsys.readouterr().out


def test_hf_download_needs_no_tokenizer_flag(llama3_tokenizer_path, hf_model_dir, capsys):
    _, download = hf_model_dir(vocab_size=300 + 256)
    write_llama3_download(download, llama3_tokenizer_path, original=True)
    outputs = []
    for kind in (TiktokenTokenizer, HuggingFaceTokenizer):  # original/tokenizer.model, then tokenizer.json
        assert isinstance(load_tokenizer(download), kind)
        args = ["--hf", str(download), "--prompt", "the cat", "--max-new-tokens", "4"]
        assert generate_lib.main(args) == 0
        outputs.append(capsys.readouterr().out)
        if kind is TiktokenTokenizer:
            shutil.rmtree(download / "original")
    assert (
        outputs[0] == outputs[1] and outputs[0].startswith("the cat") and len(outputs[0]) > len("the cat\n")
    )


@pytest.mark.parametrize(
    "extra,message",
    [
        ([], "No tokenizer"),
        (["--prompt-too-long"], "exceed the model's context of 96 tokens"),
        (["--small-vocab"], "do not belong together"),
        (["--temperature", "-1"], "--temperature must be at least 0, got -1.0"),
        (["--top-p", "1.5"], "--top-p must be in (0, 1], got 1.5"),
        (["--template", "hf"], "has no chat template"),
    ],
)
def test_errors_are_one_sentence(model_and_tokenizer, tmp_path, capsys, monkeypatch, extra, message):
    ckpt, tokenizer_path, params = model_and_tokenizer
    args = ["--ckpt", str(ckpt), "--prompt", "hi"]
    if extra == ["--prompt-too-long"]:
        args = ["--ckpt", str(ckpt), "--tokenizer", tokenizer_path, "--prompt", "word " * 200]
    if extra == ["--small-vocab"]:
        small = CFG.replace(vocab_size=100)
        save_params(tmp_path / "small", init_params(small, jax.random.key(0)), small)
        args = ["--ckpt", str(tmp_path / "small"), "--tokenizer", tokenizer_path, "--prompt", "hi"]
    if extra and extra[0] in ("--temperature", "--top-p"):  # out of range, found before loading
        args = ["--ckpt", str(tmp_path / "absent"), "--prompt", "hi", *extra]
    if extra == ["--template", "hf"]:  # a SentencePiece model alone has no Jinja template
        monkeypatch.setattr("sys.stdin", io.StringIO("hi\n"))
        args = ["--ckpt", str(ckpt), "--tokenizer", tokenizer_path, "--chat", "--template", "hf"]
    assert generate_lib.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1
