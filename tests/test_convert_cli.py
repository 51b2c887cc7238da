"""`python -m llama_jax.convert`: end to end, and one clear sentence for every bad input."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from conftest import hf_logits
from test_convert_meta import MODELS, write_meta

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


def test_hf_to_meta_to_hf(hf_model_dir, tmp_path):
    """--to meta in 2 shards (Llama 3 layout: GQA, RoPE base 500000), read back by --from meta."""
    model, path = hf_model_dir(**MODELS["gqa"][0])
    meta, exported = tmp_path / "meta", tmp_path / "hf"
    argv = ["--from", "hf", str(path), "--to", "meta", str(meta), "--shards", "2", "--dtype", "float32"]
    assert main(argv + ["--no-progress"]) == 0
    assert sorted(p.name for p in meta.iterdir()) == [
        "consolidated.00.pth",
        "consolidated.01.pth",
        "params.json",
    ]
    shard = torch.load(meta / "consolidated.01.pth", weights_only=True)
    assert (
        shard["tok_embeddings.weight"].shape == (64, 64)
        and shard["tok_embeddings.weight"].dtype == torch.float32
    )
    assert main(["--from", "meta", str(meta), "--to", "hf", str(exported), "--no-progress"]) == 0
    tokens = np.random.default_rng(0).integers(0, 128, size=(2, 40), dtype=np.int32)
    reloaded = transformers.LlamaForCausalLM.from_pretrained(exported).eval()
    error = np.abs(hf_logits(reloaded, tokens) - hf_logits(model, tokens)).max()
    print(f"CLI hf -> meta (2 shards) -> hf: max abs logit error {error:.2e}")
    assert error < TOLERANCE

    assert main(["--from", "hf", str(path), "--to", "meta", str(tmp_path / "bf16"), "--no-progress"]) == 0
    assert torch.load(tmp_path / "bf16" / "consolidated.00.pth")["norm.weight"].dtype == torch.bfloat16


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
    "missing_meta_shard": (
        lambda make, tmp: _missing_meta_shard(make, tmp),
        r"lacks consolidated\.01\.pth but has consolidated\.03\.pth",
    ),
    "stray_meta_shard": (
        lambda make, tmp: _stray_meta_shard(make, tmp),
        r"lacks consolidated\.04\.pth but has consolidated\.05\.pth: Meta's shards are numbered",
    ),
    "disagreeing_meta_shards": (
        lambda make, tmp: _disagreeing_meta_shards(make, tmp),
        r"Shards disagree on the shape of layers\.1\.attention\.wo\.weight: \(64, 32\) in "
        r"consolidated\.00\.pth, \(64, 16\) in consolidated\.01\.pth",
    ),
    "params_json_without_field": (
        lambda make, tmp: _params_json_without(make, tmp, "n_heads"),
        r"^error: params\.json lacks 'n_heads'\.$",
    ),
    "meta_shards_that_do_not_split": (
        lambda make, tmp: ["--from", "hf", str(make()[1]), "--to", "meta", str(tmp / "out"), "--shards", "3"],
        r"Meta's layout cannot split the attention heads \(4\) into 3 shards\.",
    ),
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


def _stray_meta_shard(make, tmp):
    model, _ = make(intermediate_size=192)
    path = write_meta(model, tmp / "meta", dict(multiple_of=32), n_shards=4)
    (path / "consolidated.05.pth").write_bytes((path / "consolidated.03.pth").read_bytes())
    return ["--from", "meta", str(path), "--to", "meta", str(tmp / "out")]


def _disagreeing_meta_shards(make, tmp):
    model, _ = make(intermediate_size=192)
    path = write_meta(model, tmp / "meta", dict(multiple_of=32))
    shard = torch.load(path / "consolidated.01.pth", weights_only=True)
    shard["layers.1.attention.wo.weight"] = shard["layers.1.attention.wo.weight"][:, :16].clone()
    torch.save(shard, path / "consolidated.01.pth")
    return ["--from", "meta", str(path), "--to", "hf", str(tmp / "out")]


def _params_json_without(make, tmp, field):
    model, _ = make(intermediate_size=192)
    path = write_meta(model, tmp / "meta", dict(multiple_of=32))
    _edit_json(path / "params.json", lambda p: p.pop(field))
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
    out = tmp_path / "out"  # every case's destination: nothing written there
    assert not out.exists() or [p.name for p in out.iterdir()] == ["keep.txt"]


def test_bad_input_exits_without_traceback(hf_model_dir, tmp_path):
    argv = _mistral(hf_model_dir(), tmp_path)
    done = _run_module(*argv)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("error: config.json has model_type")
