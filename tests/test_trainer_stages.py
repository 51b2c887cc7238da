"""The loop knows no stage: a stage defined in an experiment file, outside the package, trains
through the same CLI, checkpoints and metrics as the built-in ones."""

import json
import textwrap

import pytest

from llama_jax import train
from llama_jax.data.synthetic import random_documents, write_sentencepiece_model
from llama_jax.trainer import get_stage, registered_stages

# An experiment file with its own stage: a plain masked cross-entropy, the full logits at once
# (no chunking, no shared helper), registered by name and selected with Experiment(stage=...).
EXPERIMENT = """
import jax
import jax.numpy as jnp

from llama_jax.config import Experiment, ModelConfig, TrainConfig, OptimConfig, CheckpointConfig
from llama_jax.data.config import DataConfig, SourceConfig
from llama_jax.model import Llama
from llama_jax.trainer import Stage, register_stage


@register_stage("plain_masked_ce")
class PlainMaskedCE(Stage):
    def loss(self, exp):
        def loss(params, batch, frozen):
            logits = Llama(exp.model).apply(
                {{"params": params}}, batch["tokens"], batch["positions"], batch["segment_ids"]
            )
            log_probs = jax.nn.log_softmax(logits[:, :-1], axis=-1)
            targets = batch["tokens"][:, 1:]
            same = (batch["segment_ids"][:, 1:] == batch["segment_ids"][:, :-1]) & (batch["segment_ids"][:, 1:] != 0)
            mask = batch["loss_mask"][:, 1:] * same
            picked = jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
            return -jnp.sum(picked * mask), jnp.sum(mask), {{"masked_fraction": jnp.sum(mask) / mask.size * jnp.sum(mask)}}

        return loss


def experiment():
    return Experiment(
        name="custom",
        stage="{stage}",
        model=ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=128,
                          vocab_size=320, max_seq_len=64),
        optim=OptimConfig(peak_lr=3e-3, warmup_steps=2),
        train=TrainConfig(steps=6, batch_size=8, seq_len=32, log_every=2, eval_every=6, eval_batches=1,
                          sample_tokens=0),
        checkpoint=CheckpointConfig(every_steps=3),
        data=DataConfig(sources=(SourceConfig("{data}", kind="text_lines"),), tokenizer_path="{tokenizer}"),
        eval_data=None,
    )
"""


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("custom_stage")
    (root / "docs.txt").write_text("\n".join(random_documents(400, seed=3)))
    tokenizer = write_sentencepiece_model(str(root), vocab_size=320)
    return root, tokenizer


def _write(root, stage, tokenizer):
    path = root / f"exp_{stage}.py"
    path.write_text(
        textwrap.dedent(EXPERIMENT.format(stage=stage, data=root / "docs.txt", tokenizer=tokenizer))
    )
    return path


def _logged(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow  # two real training runs: after the suite
def test_a_stage_defined_in_an_experiment_file_trains_like_pretraining(files):
    root, tokenizer = files
    assert (
        train.main(
            ["--exp", str(_write(root, "plain_masked_ce", tokenizer)), "--workdir", str(root / "custom")]
        )
        == 0
    )
    assert "plain_masked_ce" in registered_stages()
    assert get_stage("plain_masked_ce").name == "plain_masked_ce"
    assert (
        train.main(["--exp", str(_write(root, "pretrain", tokenizer)), "--workdir", str(root / "pretrain")])
        == 0
    )
    custom, builtin = _logged(root / "custom"), _logged(root / "pretrain")
    assert [r["step"] for r in custom] == [r["step"] for r in builtin] == [2, 4, 6]
    # The same objective written another way: the same losses on the same batches and init.
    for ours, theirs in zip(custom, builtin):
        assert ours["loss"] == pytest.approx(theirs["loss"], rel=1e-4)
        assert ours["lr"] == theirs["lr"]
    assert "masked_fraction" in custom[0] and "masked_fraction" not in builtin[0]  # the stage's own metric
    assert custom[-1]["loss"] < custom[0]["loss"]
    # The loop checkpointed it (every 3 steps and at the end) as for any stage.
    steps = sorted(int(p.name) for p in (root / "custom" / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [3, 6]


def test_an_unknown_stage_is_one_sentence(files, capsys):
    root, tokenizer = files
    assert (
        train.main(["--exp", str(_write(root, "no_such_stage", tokenizer)), "--workdir", str(root / "x")])
        == 2
    )
    err = capsys.readouterr().err
    assert "Unknown stage 'no_such_stage'; the registered stages are" in err and "pretrain" in err
