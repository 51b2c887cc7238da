"""Tokenizers (SentencePiece and tiktoken) and the Llama 2 / Llama 3 chat formats."""

import subprocess
import sys

import pytest

from llama_jax import tokenizer as tokenizer_lib
from llama_jax.chat_template import encode_chat
from llama_jax.data import synthetic
from llama_jax.tokenizer import (
    SentencePieceTokenizer,
    TiktokenTokenizer,
    TokenizerFileError,
    load_tokenizer,
)

NUM_RANKS = 300

TEXTS = [
    "",
    "Hello, world!",
    " leading space and trailing space ",
    "multiple   spaces\n\n\ttabs and\r\nCRLF",
    "digits 1234567890 and 3.14159",
    "emoji 😀🚀👩‍👩‍👧 and flags 🇯🇵",
    "CJK 東京は日本の首都です。数据 모델",
    "control \x00\x01\x07\x1b[0m\x7f\x85 chars",
    "combining e\u0301 and zero\u200bwidth \ufeff bom",
    "special-token text <|eot_id|> <s> </s> [INST]",
    "a" * 30_001 + " " * 30_001 + "b",  # longer than tiktoken's safe run length
]


@pytest.fixture(scope="module")
def sp_tokenizer(tmp_path_factory):
    path = synthetic.write_sentencepiece_model(str(tmp_path_factory.mktemp("sp")))
    return load_tokenizer(path)


@pytest.fixture(scope="module")
def tt_tokenizer(tmp_path_factory):
    path = synthetic.write_tiktoken_model(str(tmp_path_factory.mktemp("tt")), NUM_RANKS)
    return load_tokenizer(path)


@pytest.fixture(params=["sp", "tt"])
def any_tokenizer(request, sp_tokenizer, tt_tokenizer):
    return {"sp": sp_tokenizer, "tt": tt_tokenizer}[request.param]


def test_load_detects_kind(sp_tokenizer, tt_tokenizer):
    assert isinstance(sp_tokenizer, SentencePieceTokenizer)
    assert isinstance(tt_tokenizer, TiktokenTokenizer)


def test_sentencepiece_llama_ids(sp_tokenizer):
    assert (sp_tokenizer.bos_id, sp_tokenizer.eos_id) == (1, 2)
    assert sp_tokenizer.vocab_size == 320
    assert sp_tokenizer.encode("hi", bos=True, eos=True)[0] == 1
    assert sp_tokenizer.encode("hi", bos=True, eos=True)[-1] == 2
    # Digits are split into single-digit pieces.
    ids = sp_tokenizer.encode("2024")
    assert [sp_tokenizer.decode([i]).strip() for i in ids if sp_tokenizer.decode([i]).strip()] == list("2024")


def test_tiktoken_special_tokens(tt_tokenizer):
    special = tt_tokenizer.special_tokens
    assert len(special) == 256
    assert tt_tokenizer.vocab_size == NUM_RANKS + 256
    expected = {
        0: "<|begin_of_text|>",
        1: "<|end_of_text|>",
        2: "<|reserved_special_token_0|>",
        3: "<|reserved_special_token_1|>",
        4: "<|finetune_right_pad_id|>",
        5: "<|reserved_special_token_2|>",
        6: "<|start_header_id|>",
        7: "<|end_header_id|>",
        8: "<|eom_id|>",
        9: "<|eot_id|>",
        10: "<|python_tag|>",
        11: "<|reserved_special_token_3|>",
        255: "<|reserved_special_token_247|>",
    }
    for offset, name in expected.items():
        assert special[name] == NUM_RANKS + offset
    assert sorted(special.values()) == list(range(NUM_RANKS, NUM_RANKS + 256))
    assert tt_tokenizer.bos_id == NUM_RANKS
    assert tt_tokenizer.stop_ids == (NUM_RANKS + 1, NUM_RANKS + 8, NUM_RANKS + 9)
    # The real file's ids.
    assert tokenizer_lib.llama3_special_tokens(128_000)["<|eot_id|>"] == 128_009
    # Text that looks like a special token is encoded as plain text.
    assert NUM_RANKS + 9 not in tt_tokenizer.encode("<|eot_id|>")


@pytest.mark.parametrize("text", TEXTS, ids=range(len(TEXTS)))
def test_round_trip(any_tokenizer, text):
    ids = any_tokenizer.encode(text)
    assert all(0 <= i < any_tokenizer.vocab_size for i in ids)
    assert any_tokenizer.decode(ids) == text


def test_lone_surrogates_become_replacement_chars(any_tokenizer):
    text = "bad \ud800 pair \udc00\ud83d end"
    assert any_tokenizer.decode(any_tokenizer.encode(text)) == "bad \ufffd pair \ufffd\ufffd end"
    # A valid pair written as two surrogates is the character it encodes.
    assert any_tokenizer.decode(any_tokenizer.encode("\ud83d\ude00")) == "😀"


def test_encode_with_offsets(any_tokenizer):
    text = "[INST] hi 東京 [/INST] answer 😀 "
    ids, starts = any_tokenizer.encode_with_offsets(text)
    assert ids == any_tokenizer.encode(text)
    assert starts == sorted(starts) and starts[0] == 0 and starts[-1] < len(text)


def test_pickle_reloads_from_file(any_tokenizer):
    import pickle

    clone = pickle.loads(pickle.dumps(any_tokenizer))
    assert clone.encode("hello 東京") == any_tokenizer.encode("hello 東京")


def test_wrong_files(tmp_path, sp_tokenizer):
    with pytest.raises(TokenizerFileError, match="not found"):
        load_tokenizer(tmp_path / "missing.model")
    (tmp_path / "empty.model").write_bytes(b"")
    with pytest.raises(TokenizerFileError, match="empty"):
        load_tokenizer(tmp_path / "empty.model")
    (tmp_path / "tokenizer.json").write_text('{"model": {"type": "BPE"}}')
    with pytest.raises(TokenizerFileError, match="JSON"):
        load_tokenizer(tmp_path / "tokenizer.json")
    (tmp_path / "junk.model").write_bytes(bytes(range(256)) * 4)
    with pytest.raises(TokenizerFileError, match="neither"):
        load_tokenizer(tmp_path / "junk.model")
    (tmp_path / "bad_line.model").write_text("YQ== 0\nYg== 1\nnot-a-line\n")
    with pytest.raises(TokenizerFileError, match="line 3"):
        load_tokenizer(tmp_path / "bad_line.model")
    (tmp_path / "few_bytes.model").write_text("YQ== 0\nYg== 1\n")
    with pytest.raises(TokenizerFileError, match="single-byte"):
        load_tokenizer(tmp_path / "few_bytes.model")
    # A directory holding tokenizer.model is accepted.
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "tokenizer.model").write_bytes(open(sp_tokenizer.path, "rb").read())
    assert isinstance(load_tokenizer(tmp_path / "dir"), SentencePieceTokenizer)


# --- chat templates ---------------------------------------------------------


def test_llama3_chat(tt_tokenizer):
    tok = tt_tokenizer
    dialog = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "  hi  "},
        {"role": "assistant", "content": " hello there \n"},
        {"role": "user", "content": "bye"},
    ]
    chat = encode_chat(tok, dialog, add_generation_prompt=True)
    sh, eh, eot = (tok.token_id(t) for t in ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"))

    def header(role):
        return [sh] + tok.encode(role) + [eh] + tok.encode("\n\n")

    expected = [tok.bos_id]
    expected_mask = [0]
    for message in dialog:
        content = tok.encode(message["content"].strip()) + [eot]
        expected += header(message["role"]) + content
        expected_mask += [0] * len(header(message["role"]))
        expected_mask += [int(message["role"] == "assistant")] * len(content)
    expected += header("assistant")
    expected_mask += [0] * len(header("assistant"))
    assert chat.ids == expected
    assert chat.assistant_mask == expected_mask
    reply = [i for i, m in zip(chat.ids, chat.assistant_mask) if m]
    assert tok.decode(reply) == "hello there<|eot_id|>"


def test_llama2_chat(sp_tokenizer):
    tok = sp_tokenizer
    dialog = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": " hi "},
        {"role": "assistant", "content": " hello there "},
        {"role": "user", "content": "bye"},
    ]
    chat = encode_chat(tok, dialog)
    # Meta strips the merged system + user text, so the space before "hi" stays.
    first = "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\n hi [/INST] hello there "
    expected = [1] + tok.encode(first) + [2] + [1] + tok.encode("[INST] bye [/INST]")
    assert chat.ids == expected
    assert len(chat.assistant_mask) == len(chat.ids)
    reply_ids = [i for i, m in zip(chat.ids, chat.assistant_mask) if m]
    # The reply and the EOS that ends it, nothing else.
    assert reply_ids[-1] == tok.eos_id
    assert tok.decode(reply_ids[:-1]) == "hello there "
    assert chat.assistant_mask[0] == 0 and chat.ids[-1] != tok.eos_id
    assert sum(chat.assistant_mask[-len(tok.encode("[INST] bye [/INST]")) - 1 :]) == 0


def test_chat_bad_dialogs(sp_tokenizer, tt_tokenizer):
    with pytest.raises(ValueError, match="alternate"):
        encode_chat(sp_tokenizer, [{"role": "assistant", "content": "x"}])
    with pytest.raises(ValueError, match="content"):
        encode_chat(tt_tokenizer, [{"role": "user"}])
    with pytest.raises(ValueError, match="at least one"):
        encode_chat(tt_tokenizer, [])
    with pytest.raises(ValueError, match="Unknown chat template"):
        encode_chat(tt_tokenizer, [{"role": "user", "content": "x"}], template="chatml")


# --- training CLI -----------------------------------------------------------


def _run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "llama_jax.tokenizer", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_train_cli(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(synthetic.random_documents(500)), encoding="utf-8")
    result = _run_cli(
        "train",
        str(corpus),
        "--model-prefix",
        str(tmp_path / "m"),
        "--vocab-size",
        "340",
        "--quiet",
    )
    assert result.returncode == 0, result.stderr
    tok = load_tokenizer(tmp_path / "m.model")
    assert tok.vocab_size == 340
    proto = tok._sp.serialized_model_proto()  # pylint: disable=protected-access
    from sentencepiece import sentencepiece_model_pb2

    model = sentencepiece_model_pb2.ModelProto.FromString(proto)
    assert model.trainer_spec.byte_fallback and model.trainer_spec.split_digits
    assert model.trainer_spec.model_type == sentencepiece_model_pb2.TrainerSpec.BPE
    assert model.normalizer_spec.name == "identity"


@pytest.mark.parametrize(
    "args, message",
    [
        (["missing.txt"], "No such file"),
        (["empty.txt"], "empty"),
        (["corpus.txt", "--vocab-size", "100"], "too small"),
        (["corpus.txt", "--vocab-size", "100000"], "Vocabulary size too high"),
    ],
)
def test_train_cli_bad_input(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "corpus.txt").write_text("\n".join(synthetic.random_documents(50)))
    result = _run_cli("train", *args, "--model-prefix", "m", "--quiet")
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
