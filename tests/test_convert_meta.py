"""Reading and writing Meta checkpoints. A random HF model written in Meta's layout by this file
(interleaved q/k, the embedding split as each family splits it, key/value heads copied when there
are more shards than heads) or by Meta's own resharding code loads with `load_meta` to the HF
model's logits, whatever the shard count; `save_meta` writes the same shards, and reads back
exactly."""

import json

import jax
import numpy as np
import pytest
import torch
from conftest import hf_logits
from llama_models.checkpoint import map_mp_rank, reshard_mp

from llama_jax.config import PRESETS, RopeScaling
from llama_jax.convert import ConversionError, config_from_meta, load_hf, load_meta, meta, save_meta
from llama_jax.model import Llama

TOLERANCE = 1e-4

# The embedding's split axis: Llama 3's VocabParallelEmbedding splits the vocabulary, the llama
# repository's ParallelEmbedding (LLaMA 1, Llama 2) the model dimension.
EMBEDDING_AXIS = {"llama3": 0, "llama2": 1}
# The fields of ModelArgs in the llama repository (Llama 2; LLaMA 1 lacks the two of GQA and the
# multiplier), a dataclass that refuses any other key.
LLAMA2_MODEL_ARGS = {"dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of"} | {
    "ffn_dim_multiplier",
    "norm_eps",
}

# Meta name -> (Hugging Face name, model-parallel split axis or None for replicated), per layer.
LAYER = {
    "attention.wq.weight": ("self_attn.q_proj.weight", 0),
    "attention.wk.weight": ("self_attn.k_proj.weight", 0),
    "attention.wv.weight": ("self_attn.v_proj.weight", 0),
    "attention.wo.weight": ("self_attn.o_proj.weight", 1),
    "feed_forward.w1.weight": ("mlp.gate_proj.weight", 0),
    "feed_forward.w3.weight": ("mlp.up_proj.weight", 0),
    "feed_forward.w2.weight": ("mlp.down_proj.weight", 1),
    "attention_norm.weight": ("input_layernorm.weight", None),
    "ffn_norm.weight": ("post_attention_layernorm.weight", None),
}

# hidden 64 -> Meta's FFN rule gives 192 with multiple_of 32, and 224 with multiplier 1.3.
MODELS = {
    "mha": (dict(intermediate_size=192), dict(multiple_of=32)),
    "gqa": (
        dict(
            intermediate_size=224,
            num_attention_heads=8,
            num_key_value_heads=2,
            rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
        ),
        dict(multiple_of=32, ffn_dim_multiplier=1.3),
    ),
}


def to_interleaved(weight, n_heads):
    """Inverse of Hugging Face's conversion permutation: rotate-half rows -> Meta's pairs."""
    rows, columns = weight.shape
    return weight.view(n_heads, 2, rows // n_heads // 2, columns).transpose(1, 2).reshape(rows, columns)


def meta_tensors(model, family="llama2"):
    """Meta's name -> (tensor, split axis) for a transformers LlamaForCausalLM."""
    config, hf = model.config, model.state_dict()
    tensors = {
        "tok_embeddings.weight": (hf["model.embed_tokens.weight"], EMBEDDING_AXIS[family]),
        "norm.weight": (hf["model.norm.weight"], None),
    }
    if not config.tie_word_embeddings:
        tensors["output.weight"] = (hf["lm_head.weight"], 0)
    for i in range(config.num_hidden_layers):
        for meta_name, (name, axis) in LAYER.items():
            tensor = hf[f"model.layers.{i}.{name}"]
            if meta_name == "attention.wq.weight":
                tensor = to_interleaved(tensor, config.num_attention_heads)
            elif meta_name == "attention.wk.weight":
                tensor = to_interleaved(tensor, config.num_key_value_heads)
            tensors[f"layers.{i}.{meta_name}"] = (tensor, axis)
    return tensors


def shard_piece(name, tensor, axis, rank, n_shards, n_kv_heads):
    """Rank `rank`'s piece: with more shards than key/value heads, each shard holds the head its
    query heads share (Llama 3.1 405B in 16 shards), so consecutive shards hold copies of it."""
    if axis is None:
        return tensor
    if name.endswith(("wk.weight", "wv.weight")) and n_shards > n_kv_heads:
        return tensor.chunk(n_kv_heads, dim=0)[rank // (n_shards // n_kv_heads)]
    return tensor.chunk(n_shards, dim=axis)[rank]


def meta_params_json(model, **fields):
    config = model.config
    return dict(
        dim=config.hidden_size,
        n_layers=config.num_hidden_layers,
        n_heads=config.num_attention_heads,
        n_kv_heads=config.num_key_value_heads,
        vocab_size=config.vocab_size,
        norm_eps=config.rms_norm_eps,
        rope_theta=config.rope_parameters["rope_theta"],
        **fields,
    )


def save_shards(path, shards, params_json):
    path.mkdir()
    for rank, shard in enumerate(shards):
        torch.save(shard, path / f"consolidated.{rank:02d}.pth")
    (path / "params.json").write_text(json.dumps(params_json))
    return path


def write_meta(model, path, params_json, n_shards=2, drop=(), family="llama2"):
    n_kv_heads = model.config.num_key_value_heads
    shards = [{} for _ in range(n_shards)]
    for name, (tensor, axis) in meta_tensors(model, family).items():
        if name not in drop:
            for rank in range(n_shards):
                shards[rank][name] = shard_piece(name, tensor, axis, rank, n_shards, n_kv_heads).clone()
    return save_shards(path, shards, meta_params_json(model, **params_json))


def meta_resharded(shards, new_size, n_kv_heads):
    """Meta's own resharding (llama_models.checkpoint), as its `maybe_reshard_state_dict` applies
    it on each rank of a new model-parallel size (Llama 3's layout)."""
    old_size = len(shards)
    size = max(new_size // old_size, 1)
    return [
        reshard_mp(
            [shards[old] for old in map_mp_rank(old_size, new_size, rank)],
            size=size,
            rank=rank % size,
            repeat_qk_qv=max(new_size // n_kv_heads, 1),
        )
        for rank in range(new_size)
    ]


def read_shards(path):
    return [torch.load(file, weights_only=True) for file in sorted(path.glob("consolidated.*.pth"))]


def same_tree(a, b):
    return jax.tree.structure(a) == jax.tree.structure(b) and all(
        np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
    )


@pytest.mark.parametrize("family", EMBEDDING_AXIS)
def test_any_shard_count_loads_to_hf_logits(hf_model_dir, tmp_path, family):
    """1, 2 and 8 shards (8: more than the model's 2 key/value heads) of either family read to the
    same parameters and the HF model's logits, and `save_meta` writes exactly those shards. Llama
    3's are cut by Meta's own resharding code (1 -> 2 -> 8, as it cuts the 405B's 8 into 16)."""
    hf_overrides, params_json = MODELS["gqa"]
    model, _ = hf_model_dir(**hf_overrides)
    n_kv_heads = model.config.num_key_value_heads
    if family == "llama3":
        one = write_meta(model, tmp_path / "1", params_json, n_shards=1, family=family)
        two = meta_resharded(read_shards(one), 2, n_kv_heads)
        fields = meta_params_json(model, **params_json)
        paths = {
            1: one,
            2: save_shards(tmp_path / "2", two, fields),
            8: save_shards(tmp_path / "8", meta_resharded(two, 8, n_kv_heads), fields),
        }
    else:
        paths = {n: write_meta(model, tmp_path / str(n), params_json, n_shards=n) for n in (1, 2, 8)}
    assert read_shards(paths[8])[0]["tok_embeddings.weight"].shape == (
        (16, 64) if family == "llama3" else (128, 8)
    )

    tokens = np.random.default_rng(0).integers(0, 128, (2, 48), dtype=np.int32)
    reference = hf_logits(model, tokens)
    cfg, first = load_meta(paths[1])
    assert (cfg.ffn_dim, cfg.n_kv_heads) == (hf_overrides["intermediate_size"], n_kv_heads)
    apply = jax.jit(Llama(cfg).apply)
    for n, path in paths.items():
        read_cfg, params = load_meta(path)
        assert read_cfg == cfg and same_tree(params, first)
        error = np.abs(np.asarray(apply({"params": params}, tokens)) - reference).max()
        print(f"{family}, {n} shard(s): max abs logit error llama_jax (load_meta) vs HF {error:.2e}")
        assert error < TOLERANCE
        written = save_meta(params, cfg, tmp_path / f"ours_{n}", shards=n, dtype="float32", family=family)
        for ours, theirs in zip(read_shards(written), read_shards(path), strict=True):
            assert ours.keys() == theirs.keys()
            assert all(torch.equal(ours[name], theirs[name]) for name in ours), n


def test_save_meta_round_trip_is_exact(hf_model_dir, tmp_path):
    """Llama 3.2 style (tied, RoPE scaling factor 32): any dtype, any shard count, read back exactly;
    the tied embedding is written as the output head Meta's models always have."""
    model, hf_path = hf_model_dir(
        **MODELS["gqa"][0]
        | dict(
            tie_word_embeddings=True,
            max_position_embeddings=131072,
            rope_parameters=dict(
                rope_type="llama3",
                rope_theta=500000.0,
                factor=32.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=8192,
            ),
        )
    )
    cfg, params = load_hf(hf_path, scan_layers=False)
    assert cfg.rope_scaling == RopeScaling(factor=32.0) and meta.meta_family(cfg) == "llama3"
    untied = dict(params, output=params["tok_embeddings"].T)

    path = save_meta(params, cfg, tmp_path / "fp32", shards=8, dtype="float32")
    fields = json.loads((path / "params.json").read_text())
    assert fields["use_scaled_rope"] and fields["rope_scaling"]["factor"] == 32.0
    read_cfg, read = load_meta(path, scan_layers=False, max_seq_len=cfg.max_seq_len)
    assert read_cfg == cfg.replace(tie_embeddings=False) and same_tree(read, untied)

    path = save_meta(params, cfg, tmp_path / "bf16", shards=2)  # Meta's dtype by default
    assert {t.dtype for shard in read_shards(path) for t in shard.values()} == {torch.bfloat16}
    _, read = load_meta(path, scan_layers=False, param_dtype="bfloat16")
    assert same_tree(read, jax.tree.map(lambda a: a.astype(jax.numpy.bfloat16), untied))


def test_params_json_of_every_preset():
    """params.json reproduces every published architecture, FFN width included, and holds only keys
    the family's loader takes: Meta's Llama 3 ModelArgs, the llama repository's dataclass."""
    from llama_models.llama3.args import ModelArgs

    for name, cfg in PRESETS.items():
        family = meta.meta_family(cfg)
        assert family == ("llama3" if name.startswith("llama3") else "llama2"), name
        fields = meta.params_json(cfg, family)
        read = config_from_meta(
            fields, fields["vocab_size"], max_seq_len=cfg.max_seq_len, tie_embeddings=cfg.tie_embeddings
        )
        assert read == cfg.replace(scan_unroll=1), name  # how to compile is not in params.json
        if family == "llama3":
            args = ModelArgs(**fields)
            assert (args.n_kv_heads, args.rope_theta, args.use_scaled_rope) == (
                cfg.n_kv_heads,
                cfg.rope_theta,
                cfg.rope_scaling is not None,
            )
        else:
            assert fields.keys() <= LLAMA2_MODEL_ARGS, name
        if name.startswith("llama1"):
            assert fields.keys() <= LLAMA2_MODEL_ARGS - {"n_kv_heads", "ffn_dim_multiplier"}, name


def test_interleaved_layout_is_metas_rope():
    """Guards the writer above: with Meta's complex-pair RoPE on the interleaved weights and
    rotate-half RoPE on the original ones, attention scores agree."""
    n_heads, head_dim, dim, length = 2, 8, 16, 5
    rng = np.random.default_rng(0)
    wq, wk = (torch.tensor(rng.normal(size=(n_heads * head_dim, dim)), dtype=torch.float64) for _ in range(2))
    x = torch.tensor(rng.normal(size=(length, dim)), dtype=torch.float64)
    inv_freq = 1.0 / 10000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.arange(length, dtype=torch.float64)[:, None] * inv_freq  # [T, head_dim/2]

    def meta_rope(w):  # llama/model.py: consecutive pairs are complex numbers
        pairs = (x @ w.T).view(length, n_heads, head_dim // 2, 2)
        rotated = (
            torch.view_as_complex(pairs.contiguous()) * torch.polar(torch.ones_like(angles), angles)[:, None]
        )
        return torch.view_as_real(rotated).reshape(length, n_heads, head_dim)

    def rotate_half_rope(w):  # transformers: the first and second halves are paired
        h = (x @ w.T).view(length, n_heads, head_dim)
        cos, sin = (f(torch.cat([angles, angles], -1))[:, None] for f in (torch.cos, torch.sin))
        return h * cos + torch.cat([-h[..., head_dim // 2 :], h[..., : head_dim // 2]], -1) * sin

    meta_scores = torch.einsum(
        "qhd,khd->hqk", meta_rope(to_interleaved(wq, n_heads)), meta_rope(to_interleaved(wk, n_heads))
    )
    hf_scores = torch.einsum("qhd,khd->hqk", rotate_half_rope(wq), rotate_half_rope(wk))
    assert torch.allclose(meta_scores, hf_scores, atol=1e-10)


def test_params_json_details(hf_model_dir, tmp_path):
    """LLaMA 1's vocab_size -1, tied embeddings (no output.weight), Llama 3.1 scaled RoPE."""
    model, _ = hf_model_dir(intermediate_size=192, tie_word_embeddings=True)
    path = write_meta(model, tmp_path / "meta", dict(multiple_of=32, use_scaled_rope=True))
    meta_params = json.loads((path / "params.json").read_text())
    (path / "params.json").write_text(json.dumps({**meta_params, "vocab_size": -1}))
    cfg, params = load_meta(path)
    assert cfg.vocab_size == 128 and cfg.tie_embeddings and "output" not in params
    assert cfg.rope_scaling == RopeScaling(factor=8.0) and cfg.max_seq_len == 131072
    cfg, _ = load_meta(path, rope_scaling_factor=32.0, max_seq_len=1024)
    assert cfg.rope_scaling.factor == 32.0 and cfg.max_seq_len == 1024
    explicit = dict(
        rope_type="llama3",
        factor=16.0,
        low_freq_factor=2.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=4096,
    )
    (path / "params.json").write_text(json.dumps({**meta_params, "rope_scaling": explicit}))
    assert load_meta(path)[0].rope_scaling == RopeScaling(16.0, 2.0, 4.0, 4096)


def test_missing_stray_and_disagreeing_shards_are_named(hf_model_dir, tmp_path):
    model, _ = hf_model_dir(intermediate_size=192)
    path = write_meta(model, tmp_path / "four", dict(multiple_of=32), n_shards=4)
    (path / "consolidated.01.pth").unlink()
    with pytest.raises(ConversionError, match=r"lacks consolidated\.01\.pth but has consolidated\.03\.pth"):
        load_meta(path)
    (path / "consolidated.02.pth").unlink()
    (path / "consolidated.03.pth").unlink()  # the last ones: only the shapes can tell
    (path / "consolidated.01.pth").write_bytes((path / "consolidated.00.pth").read_bytes())
    with pytest.raises(
        ConversionError,
        match=r"tok_embeddings\.weight in consolidated\.00\.pth has shape \(128, 16\), which is neither a "
        r"slice of the vocabulary nor of the model dimension 64 for 4 shards, but there are 2",
    ):
        load_meta(path)

    path = write_meta(model, tmp_path / "stray", dict(multiple_of=32), n_shards=4, family="llama3")
    (path / "consolidated.04.pth").write_bytes((path / "consolidated.03.pth").read_bytes())
    with pytest.raises(
        ConversionError,
        match=r"tok_embeddings\.weight has shape \(160, 64\) across 5 shards, where 4 would fit "
        r"\(is a shard missing, or one stray\?\), but params\.json implies \(128, 64\)",
    ):
        load_meta(path)

    path = write_meta(
        model, tmp_path / "dropped", dict(multiple_of=32), drop=("layers.1.feed_forward.w3.weight",)
    )
    with pytest.raises(
        ConversionError,
        match=r"consolidated\.00\.pth lacks tensor layers\.1\.feed_forward\.w3\.weight",
    ):
        load_meta(path)

    path = write_meta(model, tmp_path / "narrow", dict(multiple_of=32))
    shard = torch.load(path / "consolidated.01.pth", weights_only=True)
    shard["layers.0.feed_forward.w1.weight"] = shard["layers.0.feed_forward.w1.weight"][:-8].clone()
    torch.save(shard, path / "consolidated.01.pth")
    with pytest.raises(
        ConversionError,
        match=r"Shards disagree on the shape of layers\.0\.feed_forward\.w1\.weight: \(96, 64\) in "
        r"consolidated\.00\.pth, \(88, 64\) in consolidated\.01\.pth\.",
    ):
        load_meta(path)


def test_copies_of_a_key_value_head_must_agree(hf_model_dir, tmp_path):
    hf_overrides, params_json = MODELS["gqa"]
    model, _ = hf_model_dir(**hf_overrides)
    path = write_meta(model, tmp_path / "eight", params_json, n_shards=8)  # 4 copies of each head
    assert load_meta(path)[0].n_kv_heads == 2
    shard = torch.load(path / "consolidated.05.pth", weights_only=True)
    shard["layers.1.attention.wv.weight"] += 1.0
    torch.save(shard, path / "consolidated.05.pth")
    with pytest.raises(
        ConversionError,
        match=r"consolidated\.04\.pth and consolidated\.05\.pth hold different copies of "
        r"layers\.1\.attention\.wv\.weight",
    ):
        load_meta(path)


@pytest.mark.parametrize("field", ["dim", "n_layers", "n_heads", "multiple_of", "norm_eps"])
def test_params_json_without_a_needed_field(hf_model_dir, tmp_path, field):
    model, _ = hf_model_dir(intermediate_size=192)
    path = write_meta(model, tmp_path / "meta", dict(multiple_of=32))
    meta_params = json.loads((path / "params.json").read_text())
    del meta_params[field]
    (path / "params.json").write_text(json.dumps(meta_params))
    with pytest.raises(ConversionError, match=f"^params\\.json lacks '{field}'\\.$"):
        load_meta(path)


def test_save_meta_refusals_leave_nothing(hf_model_dir, tmp_path, monkeypatch):
    _, hf_path = hf_model_dir(**MODELS["gqa"][0])  # 8 heads, 2 key/value heads, FFN 224
    cfg, params = load_hf(hf_path)
    refusals = [
        (dict(shards=3), cfg, r"cannot split the attention heads \(8\) into 3 shards"),
        (dict(shards=4), cfg.replace(n_heads=12, n_kv_heads=6), r"cannot split 6 key/value heads into 4"),
        (dict(shards=6), cfg.replace(n_heads=12, n_kv_heads=4, ffn_dim=240, vocab_size=120), r"6 model-par"),
        (dict(), cfg.replace(head_dim=16), r"head_dim = dim / n_heads, but this model has head_dim 16"),
        (
            dict(family="llama2"),
            cfg.replace(rope_scaling=RopeScaling()),
            r"llama2 layout has no RoPE scaling",
        ),
    ]
    for kwargs, bad_cfg, message in refusals:
        with pytest.raises(ConversionError, match=message):
            save_meta(params, bad_cfg, tmp_path / "out", **kwargs)
    with monkeypatch.context() as patch:  # a width no pair gives (none exists for Meta's own rule)
        patch.setattr(meta, "ffn_dim_for", lambda *args: -1)
        with pytest.raises(ConversionError, match=r"No multiple_of and ffn_dim_multiplier give ffn_dim 224"):
            save_meta(params, cfg, tmp_path / "out")

    original_save, saved = torch.save, []

    def full_disk(shard, file):  # the second shard fails to write
        if saved:
            raise OSError(28, "No space left on device")
        saved.append(file)
        original_save(shard, file)

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match="No space left"):
        save_meta(params, cfg, tmp_path / "out", shards=2)
    assert saved and not saved[0].exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [hf_path.name]


def test_params_json_of_another_shape(hf_model_dir, tmp_path):
    model, _ = hf_model_dir(intermediate_size=192)
    path = write_meta(model, tmp_path / "meta", dict(multiple_of=64))  # ffn 192 -> 192, fine
    write_meta(model, tmp_path / "wide", dict(multiple_of=256))  # ffn 192 -> 256
    with pytest.raises(
        ConversionError,
        match=r"layers\.0\.feed_forward\.w1\.weight has shape "
        r"\(192, 64\), but params\.json implies \(256, 64\)",
    ):
        load_meta(tmp_path / "wide")
    assert load_meta(path)[0].ffn_dim == 192
