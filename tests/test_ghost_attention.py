"""python -m llama_jax.ghost_attention: replies sampled with the instruction on every user turn,
written as SFT dialogs with the instruction once and the loss on the last reply only."""

import json

import jax
import pytest

from llama_jax import ghost_attention
from llama_jax.chat_template import encode_chat
from llama_jax.checkpoint import save_params
from llama_jax.config import ModelConfig, SamplingConfig
from llama_jax.data import synthetic
from llama_jax.generate import generate
from llama_jax.model import init_params
from llama_jax.tokenizer import load_tokenizer

CFG = ModelConfig(
    dim=64,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    head_dim=16,
    ffn_dim=128,
    vocab_size=556,
    max_seq_len=1024,
    compute_dtype="float32",
    init_std=0.2,
)
INSTRUCTION = "Answer in words, not digits."


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("gatt")
    params = init_params(CFG, jax.random.key(0))
    dialogs = [
        [{"role": "system", "content": INSTRUCTION}]
        + [{"role": "user", "content": f"{i}+{t}?"} for t in range(turns)]
        for i, turns in enumerate([1, 2, 3])
    ]
    dialogs[2].insert(2, {"role": "assistant", "content": "ignored"})  # given replies are resampled
    (root / "dialogs.jsonl").write_text("".join(json.dumps({"messages": d}) + "\n" for d in dialogs))
    return {
        "root": root,
        "params": params,
        "policy": str(save_params(root / "policy", params, CFG)),
        "tokenizer": synthetic.write_tiktoken_model(str(root / "tok")),
    }


def _args(setup, out, *extra, dialogs="dialogs.jsonl"):
    return [
        "--ckpt", setup["policy"], "--tokenizer", setup["tokenizer"], "--dialogs", str(setup["root"] / dialogs),
        "--out", str(out), "--max-new-tokens", "6", "--temperature", "0", "--batch-dialogs", "2", "--quiet",
        *extra,
    ]  # fmt: skip


@pytest.mark.slow  # sampling dialogs turn by turn: after the suite
def test_replies_are_sampled_with_the_instruction_and_trained_on_the_last_turn(setup, tmp_path):
    out = tmp_path / "gatt.jsonl"
    assert ghost_attention.main(_args(setup, out)) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [len(r["messages"]) for r in records] == [3, 5, 7]
    tokenizer = load_tokenizer(setup["tokenizer"])
    for i, record in enumerate(records):
        messages = record["messages"]
        assert messages[0] == {"role": "system", "content": INSTRUCTION}  # the instruction once
        users = [m["content"] for m in messages if m["role"] == "user"]
        assert users == [f"{i}+{t}?" for t in range(len(users))]  # as they were: no instruction
        replies = [m for m in messages if m["role"] == "assistant"]
        assert [m.get("weight", 1) for m in replies] == [0] * (len(replies) - 1) + [1]
        # The last reply is what greedy decoding gives with the instruction on every user turn
        # (an independent run of the decoder on that prompt).
        attached = ghost_attention.with_instruction(INSTRUCTION, users, [m["content"] for m in replies[:-1]])
        assert all(m["content"].endswith(INSTRUCTION) for m in attached if m["role"] == "user")
        prompt = encode_chat(tokenizer, attached, template="llama3", add_generation_prompt=True).ids
        [sample] = generate(
            setup["params"], CFG, [prompt], SamplingConfig(6, 0.0), stop_tokens=tokenizer.stop_ids
        )
        stops = set(tokenizer.stop_ids)
        assert replies[-1]["content"] == tokenizer.decode([t for t in sample if t not in stops]).strip()
        # Trained as SFT: the loss mask covers the last reply only.
        chat = encode_chat(tokenizer, messages, template="llama3")
        last_only = encode_chat(tokenizer, messages[:-1], template="llama3").ids
        assert sum(chat.assistant_mask[: len(last_only)]) == 0 and sum(chat.assistant_mask) > 0


@pytest.mark.slow  # sampling: after the suite
def test_a_dialog_that_outgrows_the_context_stops_at_its_last_turn_that_fits(setup, tmp_path):
    out = tmp_path / "short.jsonl"
    assert ghost_attention.main(_args(setup, out, "--max-new-tokens", "900")) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    # Room for one 900-token reply but not a second turn: every dialog keeps its first.
    assert [len(r["messages"]) for r in records] == [3, 3, 3]
    assert all(r["messages"][-1].get("weight", 1) == 1 for r in records)


@pytest.mark.parametrize(
    "lines,message",
    [
        ([{"messages": [{"role": "user", "content": "hi"}]}], "has no system instruction"),
        ([{"messages": [{"role": "system", "content": "Be brief."}]}], "has no user turn"),
        (["not json"], "is not a dialog"),
    ],
)
def test_bad_dialogs_are_one_sentence_and_exit_2(tmp_path, capsys, lines, message):
    # The dialogs are read before any model: no policy is needed to refuse them.
    setup = {"root": tmp_path, "policy": str(tmp_path / "none"), "tokenizer": str(tmp_path / "none")}
    path = tmp_path / "bad.jsonl"
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    out = tmp_path / "o.jsonl"
    assert ghost_attention.main(_args(setup, out, dialogs=str(path))) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err and not out.exists()


def test_the_training_dialog_keeps_the_instruction_once_and_trains_the_last_reply():
    users, replies = ["a?", "b?", "c?"], ["1", "2", "3"]
    attached = ghost_attention.with_instruction(INSTRUCTION, users, replies[:2])
    assert [m["content"] for m in attached] == [
        f"a?\n\n{INSTRUCTION}",
        "1",
        f"b?\n\n{INSTRUCTION}",
        "2",
        f"c?\n\n{INSTRUCTION}",
    ]
    trained = ghost_attention.training_dialog(INSTRUCTION, users, replies)
    assert trained == [
        {"role": "system", "content": INSTRUCTION},
        {"role": "user", "content": "a?"},
        {"role": "assistant", "content": "1", "weight": 0},
        {"role": "user", "content": "b?"},
        {"role": "assistant", "content": "2", "weight": 0},
        {"role": "user", "content": "c?"},
        {"role": "assistant", "content": "3"},
    ]
