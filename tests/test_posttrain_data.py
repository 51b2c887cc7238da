"""Post-training data: assistant-only SFT masks under both chat templates, preference pairs with
the Llama 3 special-token masking, counted skips of bad records."""

import json
import logging

import numpy as np
import pytest

from llama_jax.chat_template import encode_chat
from llama_jax.data import COUNTERS, DataConfig, make_iterator, synthetic
from llama_jax.data.sources import SKIPPED
from llama_jax.posttrain import data as pdata
from llama_jax.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    return {
        "llama2": load_tokenizer(synthetic.write_sentencepiece_model(str(root / "sp"))),
        "llama3": load_tokenizer(synthetic.write_tiktoken_model(str(root / "tt"))),
    }


@pytest.fixture(autouse=True)
def fresh_counters():
    COUNTERS.reset()
    yield
    COUNTERS.reset()


def _write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return str(path)


DIALOGS = [
    [
        {"role": "system", "content": "Add."},
        {"role": "user", "content": "12+30"},
        {"role": "assistant", "content": "42"},
        {"role": "user", "content": "1+1"},
        {"role": "assistant", "content": "2"},
    ],
    [{"role": "user", "content": "7+8"}, {"role": "assistant", "content": "15"}],
    [{"role": "user", "content": "no reply here"}],  # no assistant turn
    [{"role": "user", "content": "hi"}, {"role": "bot", "content": "hello"}],  # unknown role
]


@pytest.mark.parametrize("template", ["llama2", "llama3"])
def test_sft_rows_are_packed_with_assistant_only_loss(tmp_path, tokenizers, template):
    tok = tokenizers[template]
    path = _write_jsonl(tmp_path / "sft.jsonl", [{"messages": d} for d in DIALOGS])
    config = DataConfig(
        sources=(pdata.sft_source(path, template),),
        seq_len=128,
        batch_size=1,
        shuffle=False,
        num_epochs=1,
        drop_remainder=False,
    )
    rows = list(make_iterator(config, tok, 0, 1))
    assert len(rows) == 1  # both usable dialogs packed into one row
    row = {k: v[0] for k, v in rows[0].items()}
    assert set(row["segment_ids"][row["segment_ids"] > 0]) == {1, 2}
    eos = tok.eot_id if template == "llama3" else tok.eos_id
    for segment, dialog in zip((1, 2), DIALOGS[:2]):
        where = row["segment_ids"] == segment
        tokens, mask = row["tokens"][where], row["loss_mask"][where]
        np.testing.assert_array_equal(tokens, encode_chat(tok, dialog, template=template).ids)
        assert row["positions"][where][0] == 0
        # The loss covers exactly the replies, each with the token that ends it.
        replies = [m["content"] for m in dialog if m["role"] == "assistant"]
        trained = tokens[mask == 1]
        assert list(trained).count(eos) == len(replies)
        pieces = np.split(trained, np.flatnonzero(trained == eos) + 1)[:-1]
        assert [tok.decode(p[:-1]).strip() for p in pieces] == replies
    assert COUNTERS.get(path, SKIPPED) == 2  # no assistant turn; unknown role


def test_sft_skips_are_counted_with_their_reason(tmp_path, tokenizers, caplog):
    path = _write_jsonl(tmp_path / "sft.jsonl", [{"messages": d} for d in DIALOGS[2:] + DIALOGS[:1]])
    config = DataConfig(
        sources=(pdata.sft_source(path, "llama3"),),
        seq_len=128,
        batch_size=1,
        shuffle=False,
        num_epochs=1,
        drop_remainder=False,
    )
    with caplog.at_level(logging.WARNING, logger="llama_jax.data"):
        list(make_iterator(config, tokenizers["llama3"], 0, 1))
    assert "without an assistant turn" in caplog.text and "unknown role 'bot'" in caplog.text


PAIR = {
    "prompt": [{"role": "system", "content": "Add."}, {"role": "user", "content": "12+30"}],
    "chosen": "42",
    "rejected": [{"role": "assistant", "content": "41 ok"}],
    "margin": 2,
}


@pytest.mark.parametrize("template", ["llama2", "llama3"])
@pytest.mark.parametrize("mask_special", [True, False])
def test_pair_masks_and_special_tokens(tokenizers, template, mask_special):
    tok = tokenizers[template]
    special = pdata.special_token_ids(tok)
    pair = pdata.encode_pair(
        tok, template, PAIR, seq_len=256, special=special, mask_special_tokens=mask_special
    )
    assert pair["margin"] == 2.0
    end = tok.eot_id if template == "llama3" else tok.eos_id
    for side, reply in (("chosen", "42"), ("rejected", "41 ok")):
        tokens = pair[f"{side}_tokens"]
        full = encode_chat(tok, PAIR["prompt"] + [{"role": "assistant", "content": reply}], template=template)
        np.testing.assert_array_equal(tokens, full.ids)
        loss, response = pair[f"{side}_loss_mask"], pair[f"{side}_response_mask"]
        # The loss mask: the reply and the token that ends it, nothing of the prompt.
        assert tokens[-1] == end and loss[-1] == 1
        assert tok.decode(tokens[loss == 1][:-1]).strip() == reply
        n_reply = int(loss.sum())
        assert loss[:-n_reply].sum() == 0
        # The DPO mask: the same without the special (formatting) tokens.
        if mask_special:
            assert not any(t in special for t in tokens[response == 1])
            np.testing.assert_array_equal(response, loss * ~np.isin(tokens, list(special)))
            assert response[-1] == 0 and response.sum() == loss.sum() - 1
        else:
            np.testing.assert_array_equal(response, loss)
    if template == "llama3":
        assert special == set(tok.special_tokens.values())  # all 256, headers included


def test_earlier_assistant_turns_are_prompt(tokenizers):
    tok = tokenizers["llama3"]
    record = {
        "prompt": [
            {"role": "user", "content": "1+1"},
            {"role": "assistant", "content": "2"},
            {"role": "user", "content": "2+2"},
        ],
        "chosen": "4",
        "rejected": "5",
    }
    pair = pdata.encode_pair(tok, "llama3", record, seq_len=256, special=pdata.special_token_ids(tok))
    assert tok.decode(pair["chosen_tokens"][pair["chosen_response_mask"] == 1]) == "4"


def test_bad_pairs_are_counted_and_all_bad_is_an_error(tmp_path, tokenizers):
    tok = tokenizers["llama3"]
    good = {"prompt": "2+2", "chosen": "4", "rejected": "5"}
    records = [
        good,
        "not json {",
        {"prompt": "2+2", "chosen": "4", "rejected": " 4 "},
        {"prompt": "2+2", "chosen": "4"},
        {
            "prompt": [{"role": "bot", "content": "x"}, {"role": "user", "content": "y"}],
            "chosen": "a",
            "rejected": "b",
        },
        {"prompt": "2+2", "chosen": "4", "rejected": "5", "margin": "big"},
        {"prompt": "x " * 300, "chosen": "4", "rejected": "5"},
        {"chosen": "4", "rejected": "5"},
    ]
    path = _write_jsonl(tmp_path / "pairs.jsonl", records)
    pairs = pdata.load_pairs([path], tok, "llama3", seq_len=64)
    assert len(pairs) == 1 and COUNTERS.get(path, SKIPPED) == len(records) - 1
    bad = _write_jsonl(tmp_path / "bad.jsonl", records[2:])
    with pytest.raises(ValueError, match="no usable preference pairs"):
        pdata.load_pairs([bad], tok, "llama3", seq_len=64)


def test_pair_batches_pad_shuffle_and_hold_out(tokenizers):
    tok = tokenizers["llama3"]
    special = pdata.special_token_ids(tok)
    pairs = [
        pdata.encode_pair(
            tok,
            "llama3",
            {"prompt": f"{i}+1", "chosen": str(i + 1), "rejected": "0"},
            seq_len=32,
            special=special,
        )
        for i in range(10)
    ]
    train, held = pdata.split_holdout(pairs, 0.2, seed=0)
    assert len(train) == 8 and len(held) == 2
    assert pdata.split_holdout(pairs, 0.2, seed=0)[1][0] is held[0]  # deterministic
    batches = pdata.pair_batches(train, seq_len=32, batch_size=4, seed=1)
    batch = next(batches)
    assert batch["chosen_tokens"].shape == (4, 32) and batch["margin"].shape == (4,)
    for b in range(4):
        n = int(batch["chosen_segment_ids"][b].sum())
        assert np.all(batch["chosen_segment_ids"][b, :n] == 1) and np.all(batch["chosen_tokens"][b, n:] == 0)
        assert batch["chosen_response_mask"][b, n:].sum() == 0
    # Two batches make one epoch: every training pair exactly once.
    second = next(batches)
    seen = {tuple(r[r > 0]) for b in (batch, second) for r in b["chosen_tokens"]}
    assert seen == {tuple(p["chosen_tokens"]) for p in train}


def test_prompts(tmp_path):
    path = _write_jsonl(
        tmp_path / "p.jsonl",
        [
            {"prompt": "1+1", "id": 7},
            {"messages": [{"role": "user", "content": "2+2"}, {"role": "assistant", "content": "4"}]},
            {"messages": [{"role": "assistant", "content": "only"}]},
            {"other": 1},
        ],
    )
    prompts = pdata.load_prompts([path])
    assert prompts[0] == {
        "id": "7",
        "messages": [{"role": "user", "content": "1+1"}],
        "record": {"prompt": "1+1", "id": 7},
    }
    assert prompts[1]["messages"] == [{"role": "user", "content": "2+2"}]
    assert prompts[1]["id"].endswith("p.jsonl:2")
    assert len(prompts) == 2 and COUNTERS.get(path, SKIPPED) == 2
