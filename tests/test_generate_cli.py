"""`python -m llama_jax.generate`: streamed text equals the decoded generation; chat; errors."""

import io

import jax
import pytest

from llama_jax import generate as generate_lib
from llama_jax.checkpoint import save_params
from llama_jax.config import ModelConfig, SamplingConfig
from llama_jax.data.synthetic import write_sentencepiece_model
from llama_jax.model import init_params
from llama_jax.tokenizer import load_tokenizer

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


def test_chat_answers_in_the_template(model_and_tokenizer, capsys, monkeypatch):
    ckpt, tokenizer_path, _ = model_and_tokenizer
    monkeypatch.setattr("sys.stdin", io.StringIO("hello there\n"))
    assert (
        generate_lib.main(
            ["--ckpt", str(ckpt), "--tokenizer", tokenizer_path, "--chat", "--max-new-tokens", "6"]
        )
        == 0
    )
    captured = capsys.readouterr()
    assert captured.out.startswith("> ") and len(captured.out.strip()) > 2
    assert "Chat; end with Ctrl-D." in captured.err


@pytest.mark.parametrize(
    "extra,message",
    [
        ([], "No tokenizer"),
        (["--prompt-too-long"], "exceed the model's context of 96 tokens"),
        (["--small-vocab"], "do not belong together"),
        (["--temperature", "-1"], "--temperature must be at least 0, got -1.0"),
        (["--top-p", "1.5"], "--top-p must be in (0, 1], got 1.5"),
    ],
)
def test_errors_are_one_sentence(model_and_tokenizer, tmp_path, capsys, extra, message):
    ckpt, tokenizer_path, params = model_and_tokenizer
    args = ["--ckpt", str(ckpt), "--prompt", "hi"]
    if extra == ["--prompt-too-long"]:
        args = ["--ckpt", str(ckpt), "--tokenizer", tokenizer_path, "--prompt", "word " * 200]
    if extra == ["--small-vocab"]:
        small = CFG.replace(vocab_size=100)
        save_params(tmp_path / "small", init_params(small, jax.random.key(0)), small)
        args = ["--ckpt", str(tmp_path / "small"), "--tokenizer", tokenizer_path, "--prompt", "hi"]
    if extra and extra[0].startswith("--t"):  # a sampling flag out of range, found before loading
        args = ["--ckpt", str(tmp_path / "absent"), "--prompt", "hi", *extra]
    assert generate_lib.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1
