"""`python -m llama_jax.convert`: end to end, and one clear sentence for every bad input."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import transformers
from conftest import hf_logits
from test_convert_meta import write_meta

from llama_jax.checkpoint import load_params
from llama_jax.convert.cli import main
from llama_jax.model import Llama

TOLERANCE = 1e-4
REPO = Path(__file__).resolve().parent.parent


def _run_module(*args):
    """The CLI as users run it, in a fresh interpreter that imports this checkout."""
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
    return subprocess.run(
        [sys.executable, "-m", "llama_jax.convert", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_hf_to_llama_jax_to_hf(hf_model_dir, tmp_path):
    model, path = hf_model_dir(num_attention_heads=8, num_key_value_heads=2)
    ours, exported = tmp_path / "llama_jax", tmp_path / "hf"
    done = _run_module("--from", "hf", str(path), "--to", "llama_jax", str(ours))
    assert done.returncode == 0, done.stderr
    summary = done.stdout.strip().splitlines()[-1]
    assert summary.startswith("Converted 21 tensors, ") and "bytes written to" in summary

    tokens = np.random.default_rng(0).integers(0, 128, size=(2, 40), dtype=np.int32)
    cfg, params = load_params(ours)
    error = np.abs(np.asarray(Llama(cfg).apply({"params": params}, tokens)) - hf_logits(model, tokens)).max()
    print(f"CLI hf -> llama_jax: max abs logit error {error:.2e}")
    assert error < TOLERANCE

    assert (
        main(
            [
                "--from",
                "llama_jax",
                str(ours),
                "--to",
                "hf",
                str(exported),
                "--max-shard-size",
                "50KB",
                "--no-progress",
            ]
        )
        == 0
    )
    reloaded = transformers.LlamaForCausalLM.from_pretrained(exported).eval()
    error = np.abs(hf_logits(reloaded, tokens) - hf_logits(model, tokens)).max()
    print(f"CLI hf -> llama_jax -> hf: max abs logit error {error:.2e}")
    assert error < TOLERANCE


def test_bf16_output(hf_model_dir, tmp_path):
    _, path = hf_model_dir()
    assert (
        main(
            [
                "--from",
                "hf",
                str(path),
                "--to",
                "llama_jax",
                str(tmp_path / "out"),
                "--dtype",
                "bfloat16",
                "--no-progress",
            ]
        )
        == 0
    )
    cfg, params = load_params(tmp_path / "out")
    assert cfg.param_dtype == "bfloat16"
    assert params["layers"]["attention"]["wq"].dtype.name == "bfloat16"


def _edit_json(file, change):
    data = json.loads(file.read_text())
    change(data)
    file.write_text(json.dumps(data))


def _sharded(hf_model_dir):
    _, path = hf_model_dir(max_shard_size="60KB")
    assert len(list(path.glob("*.safetensors"))) > 2
    return path


# name -> (prepare(hf_model_dir, tmp_path) -> argv, expected part of the one-line error)
BAD_INPUTS = {
    "mistral": (lambda make, tmp: _mistral(make(), tmp), "model_type 'mistral'"),
    "other_shape": (
        lambda make, tmp: _other_shape(make(), tmp),
        r"has shape \(64, 64\), but config\.json implies \(32, 64\)",
    ),
    "missing_safetensors_shard": (
        lambda make, tmp: _missing_shard(_sharded(make), tmp),
        r"lacks model-00002-of-\d+\.safetensors, a shard",
    ),
    "missing_tensor": (
        lambda make, tmp: _missing_tensor(_sharded(make), tmp),
        r"lacks tensor model\.norm\.weight",
    ),
    "missing_meta_shard": (lambda make, tmp: _missing_meta_shard(make, tmp), r"lacks consolidated\.01\.pth"),
    "non_empty_destination": (
        lambda make, tmp: _non_empty_destination(make()[1], tmp),
        "already exists and is not empty",
    ),
    "no_source": (
        lambda make, tmp: ["--from", "hf", str(tmp / "nowhere"), "--to", "hf", str(tmp / "out")],
        "does not exist",
    ),
    "not_a_params_checkpoint": (
        lambda make, tmp: ["--from", "llama_jax", str(tmp), "--to", "hf", str(tmp / "out")],
        "holds no llama_jax checkpoint",
    ),
}


def _mistral(made, tmp):
    _edit_json(made[1] / "config.json", lambda c: c.update(model_type="mistral"))
    return ["--from", "hf", str(made[1]), "--to", "llama_jax", str(tmp / "out")]


def _other_shape(made, tmp):
    _edit_json(made[1] / "config.json", lambda c: c.update(num_key_value_heads=2))
    return ["--from", "hf", str(made[1]), "--to", "llama_jax", str(tmp / "out")]


def _missing_shard(path, tmp):
    next(path.glob("model-00002-of-*.safetensors")).unlink()
    return ["--from", "hf", str(path), "--to", "hf", str(tmp / "out")]


def _missing_tensor(path, tmp):
    _edit_json(path / "model.safetensors.index.json", lambda i: i["weight_map"].pop("model.norm.weight"))
    return ["--from", "hf", str(path), "--to", "hf", str(tmp / "out")]


def _missing_meta_shard(make, tmp):
    model, _ = make(intermediate_size=192)
    path = write_meta(model, tmp / "meta", dict(multiple_of=32), n_shards=4)
    (path / "consolidated.01.pth").unlink()
    return ["--from", "meta", str(path), "--to", "llama_jax", str(tmp / "out")]


def _non_empty_destination(path, tmp):
    (tmp / "out").mkdir()
    (tmp / "out" / "keep.txt").write_text("mine")
    return ["--from", "hf", str(path), "--to", "llama_jax", str(tmp / "out")]


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_one_sentence(hf_model_dir, tmp_path, capsys, case):
    prepare, expected = BAD_INPUTS[case]
    argv = prepare(hf_model_dir, tmp_path)
    capsys.readouterr()  # what preparing printed (transformers' progress bars)
    assert main(argv + ["--no-progress"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1, err
    assert re.search(expected, err), err


def test_bad_input_exits_without_traceback(hf_model_dir, tmp_path):
    argv = _mistral(hf_model_dir(), tmp_path)
    done = _run_module(*argv)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("error: config.json has model_type")
