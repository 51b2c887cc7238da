"""LoRA adapters in PEFT's layout (`convert/peft.py`): what we save, `peft` runs as we do (fp32,
CPU); what `peft` saves, we run as it does; bad adapter directories are one sentence; and the CLI
merges adapters into the weights it writes."""

import json
import shutil

import jax
import numpy as np
import peft
import pytest
import torch
import transformers
from conftest import hf_logits

from llama_jax.config import LoraConfig
from llama_jax.convert import ConversionError, load_hf, load_peft, save_peft
from llama_jax.convert.cli import main
from llama_jax.lora import merge, merged_weights
from llama_jax.model import Llama

TOLERANCE = 1e-4
# A small Llama 3-like model: grouped-query attention (2 query heads per KV head).
MODEL = dict(num_attention_heads=4, num_key_value_heads=2, vocab_size=256)
LAYER_WEIGHTS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
PEFT_NAMES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _tokens(cfg, length=24):
    return np.random.default_rng(1).integers(0, cfg.vocab_size, size=(2, length), dtype=np.int32)


def _sides(cfg, weight):
    """Input and output axes of our weight (per layer), written out here rather than taken from
    the code under test."""
    d, f, h, k, hd = cfg.dim, cfg.ffn_dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    return {
        "wq": ((d,), (h, hd)),
        "wk": ((d,), (k, hd)),
        "wv": ((d,), (k, hd)),
        "wo": ((h, hd), (d,)),
        "w1": ((d,), (f,)),
        "w3": ((d,), (f,)),
        "w2": ((f,), (d,)),
        "output": ((d,), (cfg.vocab_size,)),
    }[weight]


def _random_adapters(cfg, lora, *, scanned=True, seed=0, dtype=np.float32):
    """Adapters in our layout with B non-zero (random normal * 0.1), so they change the model."""
    rng = np.random.default_rng(seed)

    def pair(weight, lead=()):
        ins, outs = _sides(cfg, weight)
        a = (rng.standard_normal((*lead, *ins, lora.rank)) * 0.1).astype(dtype)
        b = (rng.standard_normal((*lead, lora.rank, *outs)) * 0.1).astype(dtype)
        return {f"{weight}_lora_a": a, f"{weight}_lora_b": b}

    groups = {"attention": ("wq", "wk", "wv", "wo"), "feed_forward": ("w1", "w2", "w3")}
    out = {}
    if "output" in lora.targets:
        out.update(pair("output"))

    def layer(lead):
        sub = {}
        for group, weights in groups.items():
            for weight in weights:
                if weight in lora.targets:
                    sub.setdefault(group, {}).update(pair(weight, lead))
        return sub

    if any(t in LAYER_WEIGHTS for t in lora.targets):
        if scanned:
            out["layers"] = layer((cfg.n_layers,))
        else:
            out.update({f"layers_{i}": layer(()) for i in range(cfg.n_layers)})
    return out


def _assert_trees_equal(actual, expected):
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
        assert a.dtype == np.float32 and a.shape == e.shape
        np.testing.assert_array_equal(a, np.asarray(e, np.float32))


def _ours(cfg, params, tokens):
    return np.asarray(jax.jit(Llama(cfg).apply)({"params": params}, tokens))


def _hf(path):
    return transformers.LlamaForCausalLM.from_pretrained(path).eval()


def _peft_logits(base_path, adapter_path, tokens):
    model = peft.PeftModel.from_pretrained(_hf(base_path), str(adapter_path)).eval()
    return hf_logits(model, tokens)


@pytest.mark.parametrize("targets", [LAYER_WEIGHTS, (*LAYER_WEIGHTS, "output")], ids=["layers", "with_head"])
def test_saved_adapters_run_in_peft_as_in_llama(hf_model_dir, tmp_path, targets):
    _, path = hf_model_dir(**MODEL)
    cfg, base = load_hf(path)
    lora = LoraConfig(rank=4, alpha=8.0, targets=targets)
    adapters = _random_adapters(cfg, lora)
    save_peft(adapters, cfg, lora, tmp_path / "adapter", base=str(path))
    written = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert written["peft_type"] == "LORA" and written["r"] == 4 and written["lora_alpha"] == 8
    assert written["base_model_name_or_path"] == str(path)

    tokens = _tokens(cfg)
    theirs = _peft_logits(path, tmp_path / "adapter", tokens)
    merged = _ours(cfg, merged_weights(merge(base, adapters), lora), tokens)
    error = np.abs(merged - theirs).max()
    print(f"{'+'.join(targets)}: merged vs PEFT, max abs logit error {error:.2e}")
    assert error < TOLERANCE
    # The adapters matter: the base alone is far from both.
    assert np.abs(_ours(cfg, base, tokens) - theirs).max() > 100 * TOLERANCE

    unmerged = _ours(cfg.replace(lora=lora), merge(base, adapters), tokens)
    error = np.abs(unmerged - theirs).max()
    print(f"{'+'.join(targets)}: unmerged vs PEFT, max abs logit error {error:.2e}")
    assert error < TOLERANCE


def test_load_of_save_is_exact_in_both_layouts(hf_model_dir, tmp_path):
    _, path = hf_model_dir(**MODEL)
    cfg, _ = load_hf(path)
    lora = LoraConfig(rank=3, alpha=5.0, dropout=0.1, targets=("wv", "w2", "output", "wo"))
    stacked = _random_adapters(cfg, lora, scanned=True, seed=3)
    apart = {"output_lora_a": stacked["output_lora_a"], "output_lora_b": stacked["output_lora_b"]}
    for i in range(cfg.n_layers):
        apart[f"layers_{i}"] = jax.tree.map(lambda leaf: leaf[i], stacked["layers"])

    save_peft(stacked, cfg, lora, tmp_path / "stacked")
    save_peft(apart, cfg.replace(scan_layers=False), lora, tmp_path / "apart")
    assert (tmp_path / "stacked" / "adapter_model.safetensors").read_bytes() == (
        tmp_path / "apart" / "adapter_model.safetensors"
    ).read_bytes()
    for saved in ("stacked", "apart"):
        loaded_lora, loaded = load_peft(tmp_path / saved, cfg)
        assert loaded_lora == lora
        _assert_trees_equal(loaded, stacked)
        _, loaded = load_peft(tmp_path / saved, cfg, scan_layers=False)
        _assert_trees_equal(loaded, apart)
        _, loaded = load_peft(tmp_path / saved, cfg.replace(scan_layers=False))
        _assert_trees_equal(loaded, apart)


def test_bfloat16_adapters_stay_bfloat16(hf_model_dir, tmp_path):
    from safetensors.numpy import load_file

    _, path = hf_model_dir(**MODEL)
    cfg, _ = load_hf(path)
    lora = LoraConfig(rank=2, targets=("wq", "wv"))
    bf16 = jax.numpy.bfloat16
    adapters = jax.tree.map(lambda a: jax.numpy.asarray(a, bf16), _random_adapters(cfg, lora))
    save_peft(adapters, cfg, lora, tmp_path / "adapter")
    stored = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert {a.dtype for a in stored.values()} == {np.dtype(bf16)}
    _, loaded = load_peft(tmp_path / "adapter", cfg)
    _assert_trees_equal(loaded, jax.tree.map(lambda a: np.asarray(a).astype(np.float32), adapters))


@pytest.mark.slow  # against peft's own training-side objects: after the suite
@pytest.mark.parametrize(
    "target_modules",
    [PEFT_NAMES, r".*\.(q_proj|v_proj|down_proj)", ["q_proj", "o_proj", "lm_head"]],
    ids=["list", "regex", "with_head"],
)
def test_peft_trained_adapters_run_in_llama_as_in_peft(hf_model_dir, tmp_path, target_modules):
    _, path = hf_model_dir(**MODEL)
    cfg, base = load_hf(path)
    torch.manual_seed(1)
    model = peft.get_peft_model(
        _hf(path), peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.05, target_modules=target_modules)
    ).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.1)
    tokens = _tokens(cfg)
    theirs = hf_logits(model, tokens)
    model.save_pretrained(tmp_path / "adapter")

    lora, adapters = load_peft(tmp_path / "adapter", cfg)
    assert (lora.rank, lora.alpha, lora.dropout) == (4, 8.0, 0.05)
    if isinstance(target_modules, str):
        assert set(lora.targets) == {"wq", "wv", "w2"}
    merged = _ours(cfg, merged_weights(merge(base, adapters), lora), tokens)
    error = np.abs(merged - theirs).max()
    print(f"{target_modules}: PEFT vs ours merged, max abs logit error {error:.2e}")
    assert error < TOLERANCE
    assert np.abs(_ours(cfg, base, tokens) - theirs).max() > 100 * TOLERANCE
    unmerged = _ours(cfg.replace(lora=lora), merge(base, adapters), tokens)
    assert np.abs(unmerged - theirs).max() < TOLERANCE


@pytest.fixture
def adapter_dir(hf_model_dir, tmp_path):
    """(cfg, base path, a good PEFT directory of ours, a function that copies it with its
    adapter_config.json changed)."""
    _, path = hf_model_dir(**MODEL)
    cfg, _ = load_hf(path)
    lora = LoraConfig(rank=4, alpha=8.0, targets=LAYER_WEIGHTS)
    good = save_peft(_random_adapters(cfg, lora), cfg, lora, tmp_path / "good", base="org/base-a")

    def changed(**fields):
        copy = tmp_path / f"changed_{len(list(tmp_path.glob('changed_*')))}"
        shutil.copytree(good, copy)
        config = json.loads((copy / "adapter_config.json").read_text())
        config.update(fields)
        (copy / "adapter_config.json").write_text(json.dumps(config))
        return copy

    return cfg, path, good, changed


def _refused(path, cfg, match, **kwargs):
    with pytest.raises(ConversionError, match=match) as err:
        load_peft(path, cfg, **kwargs)
    message = str(err.value)
    assert "\n" not in message and message.endswith((".", "?")), message
    return message


@pytest.mark.parametrize(
    "fields, match",
    [
        (dict(target_modules=["q_proj", "embed_tokens"]), "model.embed_tokens.*cannot adapt"),
        (dict(target_modules=".*embed_tokens"), "model.embed_tokens.*cannot adapt"),
        (dict(target_modules=["q_proj", "c_attn"]), "'c_attn', which a Llama model does not have"),
        (dict(target_modules=r"model\.layers\.0\..*_proj"), r"in layers \[0\] only"),
        (dict(target_modules="(unclosed"), "not a regular expression"),
        (dict(peft_type="IA3"), "IA3 adapter.*only LoRA"),
        (dict(use_dora=True), "use_dora.*DoRA"),
        (dict(use_rslora=True), "use_rslora"),
        (dict(rank_pattern={"q_proj": 8}), "rank_pattern"),
        (dict(alpha_pattern={"q_proj": 8}), "alpha_pattern"),
        (dict(layers_to_transform=[0]), "layers_to_transform"),
        (dict(layers_to_transform=0), "layers_to_transform"),
        (dict(bias="lora_only"), "bias 'lora_only'"),
        (dict(modules_to_save=["lm_head"]), "modules_to_save"),
        (dict(init_lora_weights="pissa"), "init_lora_weights 'pissa'"),
        (dict(r=8), r"q_proj.lora_A.weight in .* has shape \(4, 64\), not \(8, 64\); .* says r=8\.$"),
    ],
)
def test_unsupported_adapter_configs_are_one_sentence(adapter_dir, fields, match):
    cfg, _, _, changed = adapter_dir
    _refused(changed(**fields), cfg, match)


def test_adapters_of_another_base_are_refused(adapter_dir):
    cfg, _, good, _ = adapter_dir
    message = _refused(
        good,
        cfg.replace(ffn_dim=192),
        r"gate_proj.lora_B.weight in adapter_model.safetensors has shape \(160, 4\), not \(192, 4\); ",
    )
    assert "another base" in message
    _refused(good, cfg.replace(n_layers=3), "lacks tensor .*layers.2.*and 13 more")
    _refused(good, cfg.replace(n_layers=1), "has tensor base_model.model.model.layers.1.")
    _refused(good, cfg, "saved for another base: org/base-a, not org/base-b", base="org/base-b")
    assert load_peft(good, cfg, base="org/base-a")[0].rank == 4


def test_missing_files_are_named(adapter_dir, tmp_path):
    cfg, _, good, _ = adapter_dir
    _refused(tmp_path / "absent", cfg, "does not exist")
    broken = tmp_path / "broken"
    shutil.copytree(good, broken)
    (broken / "adapter_model.safetensors").unlink()
    _refused(broken, cfg, "not a PEFT adapter directory: no adapter_model.safetensors")
    (broken / "adapter_model.safetensors").write_bytes(b"not safetensors")
    _refused(broken, cfg, "not a readable safetensors file")


def test_save_refuses_a_used_destination_and_a_mismatched_config(hf_model_dir, tmp_path):
    _, path = hf_model_dir(**MODEL)
    cfg, _ = load_hf(path)
    lora = LoraConfig(rank=4, targets=("wq", "wv"))
    adapters = _random_adapters(cfg, lora)
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "file").write_text("x")
    with pytest.raises(ConversionError, match="already exists and is not empty"):
        save_peft(adapters, cfg, lora, tmp_path / "used")
    with pytest.raises(ConversionError, match="lora.targets names"):
        save_peft(adapters, cfg, LoraConfig(rank=4, targets=("wq",)), tmp_path / "a")
    with pytest.raises(ConversionError, match="has shape"):
        save_peft(adapters, cfg, LoraConfig(rank=8, targets=("wq", "wv")), tmp_path / "b")
    head = LoraConfig(rank=4, targets=("output",))
    with pytest.raises(ConversionError, match="ties it to the embeddings"):
        save_peft(_random_adapters(cfg, head), cfg.replace(tie_embeddings=True), head, tmp_path / "c")
    assert not any((tmp_path / name).exists() for name in "abc")


@pytest.mark.slow
def test_cli_merges_adapters_into_the_written_model(hf_model_dir, tmp_path, capsys):
    _, path = hf_model_dir(**MODEL)
    cfg, _ = load_hf(path)
    lora = LoraConfig(rank=4, alpha=16.0, targets=(*LAYER_WEIGHTS, "output"))
    save_peft(_random_adapters(cfg, lora, seed=5), cfg, lora, tmp_path / "adapter")
    args = ["--from", "hf", str(path), "--to", "hf", str(tmp_path / "merged"), "--no-progress"]
    assert main([*args, "--no-tokenizer", "--merge-lora", str(tmp_path / "adapter")]) == 0
    assert "with the LoRA adapters of" in capsys.readouterr().out
    tokens = _tokens(cfg)
    theirs = _peft_logits(path, tmp_path / "adapter", tokens)
    error = np.abs(hf_logits(_hf(tmp_path / "merged"), tokens) - theirs).max()
    print(f"CLI --merge-lora: merged HF model vs PEFT, max abs logit error {error:.2e}")
    assert error < TOLERANCE

    bad = tmp_path / "bad"
    shutil.copytree(tmp_path / "adapter", bad)
    config = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps(dict(config, use_dora=True)))
    capsys.readouterr()  # transformers' progress bars
    for adapter in (bad, tmp_path / "absent"):
        destination = tmp_path / f"out_{adapter.name}"
        assert main([*args[:3], "--to", "hf", str(destination), "--merge-lora", str(adapter)]) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
        assert not destination.exists()
