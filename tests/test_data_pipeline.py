"""Packing, mixing, per-process sharding, determinism and exact resume."""

import collections
import json

import grain
import numpy as np
import pytest

from llama_jax.chat_template import encode_chat
from llama_jax.data import COUNTERS, DataConfig, SourceConfig, make_iterator, pipeline, synthetic
from llama_jax.tokenizer import load_tokenizer

SEQ_LEN = 64


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return load_tokenizer(synthetic.write_sentencepiece_model(str(tmp_path_factory.mktemp("sp"))))


@pytest.fixture(scope="module")
def tiktoken_tokenizer(tmp_path_factory):
    return load_tokenizer(synthetic.write_tiktoken_model(str(tmp_path_factory.mktemp("tt"))))


def write_docs(path, docs, field="text"):
    with open(path, "w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps({field: doc}) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """200 numbered documents of 1-60 words; a few are longer than SEQ_LEN tokens."""
    docs = [f"doc{i} {t}" for i, t in enumerate(synthetic.random_documents(200, seed=5))]
    return write_docs(tmp_path_factory.mktemp("corpus") / "docs.jsonl", docs), docs


def make_config(*sources, **kwargs):
    defaults = dict(tokenizer_path="unused", seq_len=SEQ_LEN, batch_size=4, seed=0)
    return DataConfig(sources=tuple(sources), **{**defaults, **kwargs})


def documents_in(batch):
    """Token arrays of the documents (segments) in a batch, row by row."""
    for row in range(batch["tokens"].shape[0]):
        segments = batch["segment_ids"][row]
        for segment in range(1, segments.max() + 1):
            yield batch["tokens"][row][segments == segment]


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def test_batch_contract(tokenizer, corpus):
    path, _ = corpus
    batch = next(make_iterator(make_config(SourceConfig(path)), tokenizer, 0, 1))
    assert sorted(batch) == ["loss_mask", "positions", "segment_ids", "tokens"]
    for key, dtype in [
        ("tokens", np.int32),
        ("positions", np.int32),
        ("segment_ids", np.int32),
        ("loss_mask", np.float32),
    ]:
        assert batch[key].shape == (4, SEQ_LEN) and batch[key].dtype == dtype
    for row in range(4):
        segments, positions = batch["segment_ids"][row], batch["positions"][row]
        tokens, mask = batch["tokens"][row], batch["loss_mask"][row]
        used = segments > 0
        # Documents are numbered 1, 2, 3, ... from the row's start; padding is 0 at the end.
        assert used[0] and np.all(np.diff(used.astype(int)) <= 0)
        assert list(np.unique(segments[used])) == list(range(1, segments.max() + 1))
        assert np.all(np.diff(segments[used]) >= 0)
        # Positions count from 0 within each document.
        for segment in range(1, segments.max() + 1):
            np.testing.assert_array_equal(
                positions[segments == segment], np.arange(np.sum(segments == segment))
            )
        np.testing.assert_array_equal(mask, used.astype(np.float32))
        assert np.all(tokens[~used] == 0) and np.all(positions[~used] == 0)


def test_documents_round_trip_with_bos_eos(tokenizer, corpus):
    path, docs = corpus
    config = make_config(SourceConfig(path), num_epochs=1, drop_remainder=False, seq_len=512, shuffle=False)
    seen = []
    for batch in make_iterator(config, tokenizer, 0, 1):
        for tokens in documents_in(batch):
            assert tokens[0] == tokenizer.bos_id and tokens[-1] == tokenizer.eos_id
            seen.append(tokenizer.decode(tokens[1:-1]))
    assert sorted(seen) == sorted(docs)


@pytest.mark.parametrize("packing", ["first_fit", "concat_then_split"])
def test_long_documents_are_split_not_dropped(tmp_path, tokenizer, packing):
    long_doc = " ".join(f"w{i}" for i in range(400))
    docs = [long_doc, "short one", "another short one"]
    path = write_docs(tmp_path / "long.jsonl", docs)
    COUNTERS.reset()
    config = make_config(
        SourceConfig(path),
        num_epochs=1,
        drop_remainder=False,
        shuffle=False,
        packing=packing,
        batch_size=2,
    )
    batches = list(make_iterator(config, tokenizer, 0, 1))
    expected = sum(len(tokenizer.encode(d, bos=True, eos=True)) for d in docs)
    assert sum(int(b["loss_mask"].sum()) for b in batches) == expected
    assert sum(int((b["segment_ids"] > 0).sum()) for b in batches) == expected
    assert COUNTERS.total(pipeline.SPLIT) == 1
    # Every piece restarts its positions at 0 and fits in a row.
    for batch in batches:
        starts = (batch["positions"] == 0) & (batch["segment_ids"] > 0)
        assert starts.sum() == batch["segment_ids"].max(axis=1).sum()
    all_tokens = np.concatenate([t for b in batches for t in documents_in(b)])
    first = tokenizer.encode(long_doc, bos=True, eos=True)
    assert tokenizer.decode(all_tokens[: len(first)]) == tokenizer.decode(first)


def test_concat_then_split_fills_rows(tokenizer, corpus):
    path, _ = corpus
    batch = next(make_iterator(make_config(SourceConfig(path), packing="concat_then_split"), tokenizer, 0, 1))
    assert np.all(batch["segment_ids"] > 0)


def test_chat_source_masks_all_but_replies(tmp_path, tiktoken_tokenizer):
    dialog = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello there"},
    ]
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(json.dumps({"messages": dialog}) for _ in range(3)) + "\n")
    source = SourceConfig(str(path), field="messages", chat_template="llama3")
    batch = next(make_iterator(make_config(source, batch_size=1, seq_len=256), tiktoken_tokenizer, 0, 1))
    expected = encode_chat(tiktoken_tokenizer, dialog)
    tokens, mask = batch["tokens"][0], batch["loss_mask"][0]
    n = len(expected.ids)
    np.testing.assert_array_equal(tokens[:n], expected.ids)
    np.testing.assert_array_equal(mask[:n], expected.assistant_mask)
    assert tiktoken_tokenizer.decode(tokens[mask == 1][:n]).startswith("hello there<|eot_id|>")


def test_pre_tokenized_source(tmp_path, tokenizer, corpus):
    from array_record.python.array_record_module import ArrayRecordWriter

    _, docs = corpus
    writer = ArrayRecordWriter(str(tmp_path / "t.array_record"), "group_size:1")
    for doc in docs:
        writer.write(np.asarray(tokenizer.encode(doc), "<i4").tobytes())
    writer.close()
    pre = make_config(SourceConfig(str(tmp_path), kind="arrayrecord", tokenized=True))
    raw = make_config(SourceConfig(corpus[0]))
    assert_same_batches(
        take(make_iterator(pre, tokenizer, 0, 1), 3), take(make_iterator(raw, tokenizer, 0, 1), 3)
    )


def test_mixture_proportions(tmp_path, tokenizer):
    weights = {"alpha": 0.50, "beta": 0.25, "gamma": 0.17, "delta": 0.08}
    sources = []
    for name, weight in weights.items():
        docs = [f"{name} {i}" for i in range(300)]  # fewer than drawn: sources repeat
        sources.append(SourceConfig(write_docs(tmp_path / f"{name}.jsonl", docs), weight=weight, name=name))
    config = make_config(*sources, seq_len=128, batch_size=16)
    counts = collections.Counter()
    iterator = make_iterator(config, tokenizer, 0, 1)
    while sum(counts.values()) < 10_000:
        for tokens in documents_in(next(iterator)):
            counts[tokenizer.decode(tokens[1:-1]).split()[0]] += 1
    total = sum(counts.values())
    for name, weight in weights.items():
        assert abs(counts[name] / total - weight) < 0.02, (name, counts[name] / total)


def test_processes_read_disjoint_shards(tokenizer, corpus):
    path, docs = corpus
    config = make_config(SourceConfig(path), num_epochs=1, drop_remainder=False, seq_len=512)
    seen = []
    for process in range(2):
        texts = [
            tokenizer.decode(tokens[1:-1])
            for batch in make_iterator(config, tokenizer, process, 2)
            for tokens in documents_in(batch)
        ]
        seen.append(set(texts))
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == set(docs)
    assert abs(len(seen[0]) - len(seen[1])) <= 1


def test_split_by_rows_gives_each_process_its_rows_of_the_one_process_batches(tokenizer, corpus):
    path, _ = corpus
    whole = take(make_iterator(make_config(SourceConfig(path), batch_size=4), tokenizer, 0, 1), 3)
    rows = make_config(SourceConfig(path), batch_size=2, split_by="rows")
    halves = [take(make_iterator(rows, tokenizer, process, 2), 3) for process in range(2)]
    for step, batch in enumerate(whole):
        for key in batch:
            glued = np.concatenate([halves[0][step][key], halves[1][step][key]])
            assert np.array_equal(glued, batch[key]), (step, key)
    # By documents, the same two processes see other batches.
    by_docs = take(make_iterator(make_config(SourceConfig(path), batch_size=2), tokenizer, 0, 2), 1)
    assert not np.array_equal(by_docs[0]["tokens"], whole[0]["tokens"][:2])


def test_same_seed_same_batches_and_epochs_differ(tokenizer, corpus):
    path, _ = corpus
    config = make_config(SourceConfig(path))
    assert_same_batches(
        take(make_iterator(config, tokenizer, 0, 1), 5),
        take(make_iterator(config, tokenizer, 0, 1), 5),
    )
    other = take(make_iterator(make_config(SourceConfig(path), seed=1), tokenizer, 0, 1), 1)[0]
    assert not np.array_equal(other["tokens"], take(make_iterator(config, tokenizer, 0, 1), 1)[0]["tokens"])
    # Two epochs hold every document twice, in a different order each time.
    two = make_config(SourceConfig(path), num_epochs=2, drop_remainder=False, seq_len=512, packing_bins=1)
    order = [
        tokenizer.decode(t[1:-1]).split()[0]
        for b in make_iterator(two, tokenizer, 0, 1)
        for t in documents_in(b)
    ]
    assert len(order) == 400 and order[:200] != order[200:]
    assert sorted(order[:200]) == sorted(order[200:])


@pytest.mark.parametrize("packing", ["first_fit", "concat_then_split"])
def test_resume_gives_exactly_the_next_batches(tmp_path, tokenizer, corpus, packing):
    # Documents of up to 60 words in rows of 32 tokens: states fall in the middle
    # of split documents and of packing.
    config = make_config(SourceConfig(corpus[0]), seq_len=32, packing=packing)
    uninterrupted = take(make_iterator(config, tokenizer, 0, 1), 12)
    iterator = make_iterator(config, tokenizer, 0, 1)
    consumed = 0
    for skip in (1, 3, 2):
        take(iterator, skip)
        consumed += skip
        state = json.loads(json.dumps(iterator.get_state()))  # survives JSON
        restored = make_iterator(config, tokenizer, 0, 1)
        restored.set_state(state)
        assert_same_batches(take(restored, 12 - consumed), uninterrupted[consumed:])


def test_resume_through_orbax(tmp_path, tokenizer, corpus):
    import orbax.checkpoint as ocp

    config = make_config(SourceConfig(corpus[0]), seq_len=32)
    uninterrupted = take(make_iterator(config, tokenizer, 0, 1), 8)
    iterator = make_iterator(config, tokenizer, 0, 1)
    take(iterator, 5)
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        manager.save(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(iterator)))
        manager.wait_until_finished()
    fresh = make_iterator(config, tokenizer, 0, 1)
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        manager.restore(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
    assert_same_batches(take(fresh, 3), uninterrupted[5:])


def test_worker_processes_resume(tokenizer, corpus):
    config = make_config(SourceConfig(corpus[0]), seq_len=32, worker_count=2)
    iterator = make_iterator(config, tokenizer, 0, 1)
    uninterrupted = take(iterator, 6)
    iterator = make_iterator(config, tokenizer, 0, 1)
    take(iterator, 3)
    state = iterator.get_state()
    restored = make_iterator(config, tokenizer, 0, 1)
    restored.set_state(state)
    assert_same_batches(take(restored, 3), uninterrupted[3:])
