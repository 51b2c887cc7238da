"""Tokenizers (SentencePiece, tiktoken and Hugging Face tokenizer.json) and the Llama 2 / Llama 3
chat formats."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import llama_models
import pytest
import transformers
from llama_models.llama3.tokenizer import Tokenizer as MetaTokenizer

from llama_jax import tokenizer as tokenizer_lib
from llama_jax.chat_template import encode_chat
from llama_jax.data import synthetic
from llama_jax.tokenizer import (
    HuggingFaceTokenizer,
    SentencePieceTokenizer,
    SpecialTokenError,
    TiktokenTokenizer,
    TokenizerFileError,
    load_tokenizer,
)

# Meta's Llama 3 tiktoken file, shipped with Meta's llama-models package.
META_LLAMA3_FILE = os.path.join(os.path.dirname(llama_models.__file__), "llama3", "tokenizer.model")

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


def write_llama3_download(directory, tiktoken_file, *, original=False, chat_template=None) -> Path:
    """A Llama 3 tokenizer as a Hugging Face download of Meta's holds it: tokenizer.json built by
    transformers' own converter from the tiktoken file, tokenizer_config.json naming the instruct
    model's EOS (<|eot_id|>), and with `original`, Meta's file in original/tokenizer.model."""
    from transformers.convert_slow_tokenizer import TikTokenConverter

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    num_ranks = len(tokenizer_lib.read_tiktoken_ranks(str(tiktoken_file)))
    specials = list(tokenizer_lib.llama3_special_tokens(num_ranks))
    fast = TikTokenConverter(vocab_file=str(tiktoken_file), extra_special_tokens=specials).converted()
    fast.save(str(directory / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|begin_of_text|>",
        "eos_token": "<|eot_id|>",
        "clean_up_tokenization_spaces": False,
    }
    if chat_template is not None:
        config["chat_template"] = chat_template
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    if original:
        (directory / "original").mkdir()
        shutil.copy(tiktoken_file, directory / "original" / "tokenizer.model")
    return directory


@pytest.fixture(scope="module")
def json_tokenizer(tmp_path_factory, tt_tokenizer):
    return load_tokenizer(write_llama3_download(tmp_path_factory.mktemp("json"), tt_tokenizer.path))


@pytest.fixture(scope="module")
def meta_llama3_download(tmp_path_factory):
    """(our tokenizer of the download's tokenizer.json, transformers' of the same files)."""
    directory = write_llama3_download(tmp_path_factory.mktemp("meta_json"), META_LLAMA3_FILE)
    return load_tokenizer(directory), transformers.AutoTokenizer.from_pretrained(directory)


@pytest.fixture(params=["sp", "tt", "json"])
def any_tokenizer(request, sp_tokenizer, tt_tokenizer, json_tokenizer):
    return {"sp": sp_tokenizer, "tt": tt_tokenizer, "json": json_tokenizer}[request.param]


def test_load_detects_kind(sp_tokenizer, tt_tokenizer, json_tokenizer):
    assert isinstance(sp_tokenizer, SentencePieceTokenizer)
    assert isinstance(tt_tokenizer, TiktokenTokenizer)
    assert isinstance(json_tokenizer, HuggingFaceTokenizer)


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
    # Meta's stop tokens on Meta's file: end of text, end of message (tool calls), end of turn.
    meta = MetaTokenizer(Path(META_LLAMA3_FILE))
    assert TiktokenTokenizer(META_LLAMA3_FILE).stop_ids == tuple(meta.stop_tokens)
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
    with pytest.raises(TokenizerFileError, match="JSON but is not a tokenizer.json"):
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
    (tmp_path / "nothing").mkdir()
    with pytest.raises(
        TokenizerFileError, match="No tokenizer in .*original/tokenizer.model, tokenizer.json"
    ):
        load_tokenizer(tmp_path / "nothing")


# --- Hugging Face downloads ---------------------------------------------------


def test_tokenizer_json_encodes_as_transformers_and_meta(meta_llama3_download):
    tok, reference = meta_llama3_download
    meta = MetaTokenizer(Path(META_LLAMA3_FILE))
    assert isinstance(tok, HuggingFaceTokenizer) and tok.family == "llama3"
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (
        meta.n_words,
        meta.bos_id,
        meta.eos_id,
        meta.pad_id,
    )
    assert tok.stop_ids == tuple(meta.stop_tokens)  # end of text, end of message, end of turn
    assert tok.token_id("<|python_tag|>") == meta.python_tag_id
    for text in TEXTS:
        # transformers reads special-token text as special tokens; we do when told to.
        expected = reference(text, add_special_tokens=False, return_offsets_mapping=True)
        assert tok.encode(text, allowed_special="all") == expected["input_ids"]
        ids, starts = tok.encode_with_offsets(text, allowed_special="all")
        assert ids == expected["input_ids"] and starts == [start for start, _ in expected["offset_mapping"]]
        assert tok.decode(tok.encode(text)) == text
        if len(text) < 25_000:  # Meta cuts longer runs before encoding, transformers does not
            assert tok.encode(text, bos=True, eos=True) == meta.encode(text, bos=True, eos=True)


def test_download_directory_lookup(tmp_path, tt_tokenizer, json_tokenizer):
    download = write_llama3_download(tmp_path / "download", tt_tokenizer.path, original=True)
    # Meta's own file wins; the download's tokenizer_config.json still goes with it.
    from_original = load_tokenizer(download)
    assert isinstance(from_original, TiktokenTokenizer)
    assert from_original.path == str(download / "original" / "tokenizer.model")
    assert from_original.tokenizer_config["eos_token"] == "<|eot_id|>"
    shutil.copy(tt_tokenizer.path, download / "tokenizer.model")
    assert load_tokenizer(download).path == str(download / "tokenizer.model")
    # Only tokenizer.json: the same ids, through the tokenizers library.
    assert isinstance(json_tokenizer, HuggingFaceTokenizer)
    for name in ("vocab_size", "bos_id", "eos_id", "pad_id", "stop_ids", "special_tokens", "family"):
        assert getattr(json_tokenizer, name) == getattr(from_original, name), name
    for text in TEXTS[:-1]:
        assert json_tokenizer.encode(text) == from_original.encode(text)


def test_llama2_tokenizer_json(tmp_path, sp_tokenizer):
    # transformers' own conversion of the SentencePiece model, saved as a download holds it.
    source = tmp_path / "source"
    source.mkdir()
    shutil.copy(sp_tokenizer.path, source / "tokenizer.model")
    (source / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer"}))
    transformers.AutoTokenizer.from_pretrained(source).save_pretrained(tmp_path / "download")
    assert not (tmp_path / "download" / "tokenizer.model").exists()
    tok = load_tokenizer(tmp_path / "download")
    reference = transformers.AutoTokenizer.from_pretrained(tmp_path / "download")
    assert isinstance(tok, HuggingFaceTokenizer) and tok.family == "llama2"
    assert (tok.bos_id, tok.eos_id, tok.stop_ids, tok.vocab_size) == (1, 2, (2,), sp_tokenizer.vocab_size)
    assert tok.special_tokens == sp_tokenizer.special_tokens == {"<unk>": 0, "<s>": 1, "</s>": 2}
    for text in TEXTS[:-1] + ["<s>[INST] hi [/INST] answer </s>"]:
        assert tok.encode(text, allowed_special="all") == reference.encode(text, add_special_tokens=False)
    chat = encode_chat(tok, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}])
    assert chat.ids[0] == 1 and chat.ids[-1] == 2 and tok.decode(chat.ids[1:-1]) == "[INST] hi [/INST] yo "


ALLOWED_SPECIAL = ["all", {"<|eot_id|>"}, {"<|python_tag|>", "<|not_a_token|>"}, set()]


@pytest.mark.parametrize("allowed", ALLOWED_SPECIAL, ids=["all", "eot", "python_tag", "none"])
def test_allowed_special_as_meta(meta_llama3_download, allowed):
    meta = MetaTokenizer(Path(META_LLAMA3_FILE))
    ours = [TiktokenTokenizer(META_LLAMA3_FILE), meta_llama3_download[0]]
    text = "x<|eot_id|> y <|python_tag|>print(1)<|begin_of_text|><|eot_id|>"
    expected = meta.encode(text, bos=True, eos=False, allowed_special=allowed)
    for tok in ours:
        assert tok.encode(text, bos=True, allowed_special=allowed) == expected
        assert tok.decode(expected) == "<|begin_of_text|>" + text
    # disallowed_special: where Meta refuses special-token text, so do we, in one sentence.
    for disallowed in ("all", {"<|begin_of_text|>"}, {"<|eom_id|>"}):
        try:
            expected = meta.encode(
                text, bos=False, eos=False, allowed_special=allowed, disallowed_special=disallowed
            )
        except ValueError:
            expected = None
        for tok in ours:
            if expected is None:
                with pytest.raises(
                    SpecialTokenError, match=r"^The text holds the special token '<\|[a-z_]+\|>'[^.]*\.$"
                ):
                    tok.encode(text, allowed_special=allowed, disallowed_special=disallowed)
            else:
                assert tok.encode(text, allowed_special=allowed, disallowed_special=disallowed) == expected


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
