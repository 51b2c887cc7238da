"""Checkpoint averaging: the averaged checkpoint equals the element-wise mean of its sources; a
workdir's newest checkpoints can be named by count; other architectures are one sentence."""

import dataclasses

import jax
import numpy as np
import pytest

from llama_jax import average
from llama_jax.checkpoint import CheckpointConfig, TrainCheckpointer, load_for_inference, save_params
from llama_jax.config import ModelConfig
from llama_jax.model import init_params

CFG = ModelConfig(
    dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, ffn_dim=64, vocab_size=64, max_seq_len=32
)


def _params(seed, cfg=CFG):
    return jax.device_get(init_params(cfg, jax.random.key(seed)))


def _mean(*trees):
    return jax.tree.map(
        lambda *xs: (sum(np.asarray(x, np.float64) for x in xs) / len(xs)).astype(np.float32), *trees
    )


def _assert_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """Two exports of one model and one of a wider model."""
    root = tmp_path_factory.mktemp("exports")
    a, b = _params(0), _params(1)
    save_params(root / "a", a, CFG)
    save_params(root / "b", b, CFG)
    wider = CFG.replace(ffn_dim=96)
    save_params(root / "wider", _params(2, wider), wider)
    # The same model exported with another tokenizer beside it (and one with a copy of a's).
    save_params(root / "other_tokenizer", b, CFG)
    (root / "a" / "tokenizer.model").write_bytes(b"tokenizer one")
    (root / "other_tokenizer" / "tokenizer.model").write_bytes(b"tokenizer two")
    return root, a, b


def test_two_exports_average_to_their_mean(exports, tmp_path):
    root, a, b = exports
    assert average.main([str(root / "a"), str(root / "b"), "--out", str(tmp_path / "avg")]) == 0
    cfg, averaged = load_for_inference(tmp_path / "avg")  # checksums written and verified
    assert cfg == CFG
    _assert_equal(averaged, _mean(a, b))
    assert not np.array_equal(np.asarray(averaged["output"]), np.asarray(a["output"]))


@pytest.mark.slow  # three training checkpoints written: after the suite
def test_the_newest_checkpoints_of_a_workdir(tmp_path):
    checkpoints = TrainCheckpointer(tmp_path / "run", CheckpointConfig(keep_last=5, async_save=False))
    trees = [_params(seed) for seed in range(3)]
    experiment = {"model": dataclasses.asdict(CFG)}
    for step, params in enumerate(trees, start=1):
        checkpoints.save(step, {"step": np.int32(step), "params": params}, None, experiment)
    checkpoints.close()
    assert average.main(["--last", "2", str(tmp_path / "run"), "--out", str(tmp_path / "avg")]) == 0
    _assert_equal(load_for_inference(tmp_path / "avg")[1], _mean(*trees[1:]))


@pytest.mark.parametrize(
    "case,message",
    [
        ("other_architecture", "is a model of another architecture than"),
        ("other_tokenizer", "which differ; only models of one tokenizer can be averaged"),
        ("one", "Averaging needs at least two checkpoints, got 1."),
        ("missing", "does not exist"),
        ("too_few", "holds 0 checkpoint(s); --last 2 needs 2."),
    ],
)
def test_bad_input_is_one_sentence(exports, tmp_path, capsys, case, message):
    root = exports[0]
    args = {
        "other_architecture": [str(root / "a"), str(root / "wider")],
        "other_tokenizer": [str(root / "a"), str(root / "other_tokenizer")],
        "one": [str(root / "a")],
        "missing": [str(root / "a"), str(root / "nowhere")],
        "too_few": ["--last", "2", str(tmp_path)],
    }[case]
    assert average.main([*args, "--out", str(tmp_path / "avg")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "avg").exists()
