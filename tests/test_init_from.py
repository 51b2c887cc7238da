"""Starting from released weights: `init_from` a Hugging Face directory with `model=from_init`
takes the source's architecture and tokenizer, and the first step's loss equals the source
model's loss on the same batch computed by transformers."""

import json
import shutil
import textwrap

import numpy as np
import pytest
import torch

from llama_jax import train
from llama_jax.config import apply_overrides, load_experiment
from llama_jax.data.synthetic import random_documents, write_sentencepiece_model
from llama_jax.data.training import training_data
from llama_jax.init_from import source_config, source_kind, with_source
from llama_jax.loss import next_token_targets

EXPERIMENT = """
from llama_jax.config import CheckpointConfig, Experiment, OptimConfig, TrainConfig
from llama_jax.data.config import DataConfig, SourceConfig


def experiment():
    return Experiment(
        name="continued",
        optim=OptimConfig(peak_lr=1e-3, warmup_steps=1),
        train=TrainConfig(steps=2, batch_size=8, seq_len=32, log_every=1, eval_every=2, sample_tokens=0),
        checkpoint=CheckpointConfig(every_steps=0),
        data=DataConfig(sources=(SourceConfig("{text}", kind="text"),), packing="concat_then_split"),
        eval_data=None,
    )
"""


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """A random Hugging Face Llama (GQA, Llama 3's RoPE base) with its tokenizer beside it, as a
    download is laid out, and an experiment file over one long text."""
    import transformers
    from conftest import hf_config

    root = tmp_path_factory.mktemp("released")
    tokenizer = write_sentencepiece_model(str(root / "tok"), vocab_size=320)
    torch.manual_seed(0)
    config = hf_config(
        vocab_size=320,
        num_key_value_heads=2,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
    )
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    hf_dir = root / "Llama-toy"
    model.save_pretrained(hf_dir)
    shutil.copy(tokenizer, hf_dir / "tokenizer.model")
    (root / "book.txt").write_text(" ".join(random_documents(200, seed=3)))
    exp_file = root / "continued.py"
    exp_file.write_text(textwrap.dedent(EXPERIMENT.format(text=root / "book.txt")))
    return model, hf_dir, str(exp_file)


def test_sources_are_told_apart_and_read_without_their_weights(released, tmp_path):
    _, hf_dir, _ = released
    assert source_kind(hf_dir) == "hf"
    cfg = source_config(hf_dir)
    assert (cfg.dim, cfg.n_kv_heads, cfg.vocab_size, cfg.rope_theta) == (64, 2, 320, 500000.0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="is neither a Hugging Face directory"):
        source_kind(tmp_path / "empty")


def test_a_meta_directory_is_read_as_its_hugging_face_twin(released, tmp_path):
    """The same model in Meta's format (two shards, with its tokenizer): the same architecture
    from params.json and the shards' headers, the same parameters, its tokenizer.model found."""
    from llama_jax.config import ModelConfig
    from llama_jax.convert import load_hf, save_meta
    from llama_jax.init_from import source_params, source_tokenizer

    _, hf_dir, _ = released
    cfg, params = load_hf(hf_dir)
    meta_dir = save_meta(params, cfg, tmp_path / "meta", shards=2, dtype="float32")
    shutil.copy(hf_dir / "tokenizer.model", meta_dir / "tokenizer.model")
    assert source_kind(meta_dir) == "meta"
    fields = ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "vocab_size", "rope_theta", "norm_eps")
    found = source_config(meta_dir)
    assert {f: getattr(found, f) for f in fields} == {f: getattr(cfg, f) for f in fields}
    model = ModelConfig(**{**cfg.__dict__, "max_seq_len": found.max_seq_len})
    loaded = source_params(meta_dir, model)
    np.testing.assert_array_equal(loaded["layers"]["attention"]["wq"], params["layers"]["attention"]["wq"])
    np.testing.assert_array_equal(loaded["tok_embeddings"], params["tok_embeddings"])
    assert source_tokenizer(meta_dir) == str(meta_dir / "tokenizer.model")


def test_continued_pretraining_starts_from_the_source_model(released, tmp_path, capsys):
    model, hf_dir, exp_file = released
    overrides = [f"init_from={hf_dir}", "model=from_init"]
    workdir = tmp_path / "run"
    assert train.main(["--exp", exp_file, "--workdir", str(workdir), *overrides]) == 0

    # The architecture and the tokenizer came from the source.
    recorded = json.loads((workdir / "experiment.json").read_text())
    assert recorded["model"]["n_kv_heads"] == 2 and recorded["model"]["rope_theta"] == 500000.0
    assert recorded["data"]["tokenizer_path"] == str(hf_dir / "tokenizer.model")

    # The batch the first step saw, made again the same way, scored by transformers.
    exp = with_source(apply_overrides(load_experiment(exp_file), overrides))
    batch = next(training_data(exp, quiet=True).train)
    assert all(len(set(row[row > 0])) == 1 for row in batch["segment_ids"])  # one document a row
    with torch.no_grad():
        logits = (
            model(
                torch.as_tensor(batch["tokens"], dtype=torch.long),
                position_ids=torch.as_tensor(batch["positions"], dtype=torch.long),
            )
            .logits.double()
            .numpy()
        )
    targets, weights = (np.asarray(x) for x in next_token_targets(batch))
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    picked = np.take_along_axis(log_probs, targets[..., None], -1)[..., 0]
    reference = -(picked * weights).sum() / weights.sum()
    first = json.loads((workdir / "metrics.jsonl").read_text().splitlines()[0])
    print(f"first step's loss {first['loss']:.7f}, transformers' on the same batch {reference:.7f}")
    assert first["step"] == 1 and first["loss"] == pytest.approx(reference, rel=1e-5)


def test_a_source_of_another_architecture_than_the_model_is_one_sentence(released, tmp_path, capsys):
    _, hf_dir, exp_file = released
    assert train.main(["--exp", exp_file, "--workdir", str(tmp_path / "w"), f"init_from={hf_dir}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"error: init_from {hf_dir} is a model of another architecture (dim 64 where")
    assert "set model=from_init" in err
