"""Writing Hugging Face directories: HF -> load_hf -> save_hf -> transformers, same logits."""

import json

import numpy as np
import pytest
import transformers
from conftest import hf_logits
from safetensors import safe_open
from test_hf_parity import VARIANTS

from llama_jax.convert import ConversionError, config_from_hf, load_hf, save_hf

TOLERANCE = 1e-4


def _tokens(vocab, length=48):
    return np.random.default_rng(0).integers(0, vocab, size=(2, length), dtype=np.int64)


@pytest.mark.parametrize("variant", ["gqa", "tied", "llama31_rope_scaling"])
def test_round_trip_logits_match(hf_model_dir, tmp_path, variant):
    model, path = hf_model_dir(**VARIANTS[variant])
    cfg, params = load_hf(path)
    out = save_hf(params, cfg, tmp_path / "exported", max_shard_size="60KB")
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1
    reloaded = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    tokens = _tokens(cfg.vocab_size, length=64)  # past original_max_position_embeddings (32)
    error = np.abs(hf_logits(reloaded, tokens) - hf_logits(model, tokens)).max()
    print(f"{variant}: max abs logit error after HF -> llama_jax -> HF: {error:.2e}")
    assert error < TOLERANCE
    # transformers reads our config.json back to the same model, and so do we.
    assert config_from_hf(reloaded.config.to_dict(), scan_layers=cfg.scan_layers) == cfg
    assert config_from_hf(json.loads((out / "config.json").read_text())) == cfg
    assert reloaded.config.tie_word_embeddings == cfg.tie_embeddings


def test_released_style_config_and_index(hf_model_dir, tmp_path):
    _, path = hf_model_dir(**VARIANTS["llama31_rope_scaling"])
    cfg, params = load_hf(path, scan_layers=False)
    out = save_hf(params, cfg, tmp_path / "exported", dtype="bfloat16")
    written = json.loads((out / "config.json").read_text())
    assert written["rope_theta"] == 500000.0 and written["torch_dtype"] == "bfloat16"
    assert written["rope_scaling"] == {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32,
    }
    assert written["head_dim"] == 8 and written["tie_word_embeddings"] is False
    index = json.loads((out / "model.safetensors.index.json").read_text())
    (file,) = set(index["weight_map"].values())
    with safe_open(out / file, framework="np") as handle:
        assert set(handle.keys()) == set(index["weight_map"])
        assert handle.get_slice("lm_head.weight").get_dtype() == "BF16"
        assert handle.metadata() == {"format": "pt"}
    assert index["metadata"]["total_size"] == 2 * cfg.num_params()


def test_refuses_non_empty_destination(hf_model_dir, tmp_path):
    _, path = hf_model_dir()
    cfg, params = load_hf(path)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("keep me")
    with pytest.raises(ConversionError, match="already exists and is not empty"):
        save_hf(params, cfg, tmp_path / "taken")


def test_params_of_another_shape_are_named(hf_model_dir, tmp_path):
    _, path = hf_model_dir()
    cfg, params = load_hf(path)
    with pytest.raises(
        ConversionError,
        match=r"layers/attention/wk has shape \(2, 64, 4, 16\), "
        r"but the model config implies \(2, 64, 2, 16\)",
    ):
        save_hf(params, cfg.replace(n_kv_heads=2), tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def tokenizer_files(tmp_path_factory):
    from llama_jax.data.synthetic import write_sentencepiece_model, write_tiktoken_model

    root = tmp_path_factory.mktemp("tokenizers")
    return {
        "llama2": write_sentencepiece_model(str(root / "sp"), vocab_size=320),
        "llama3": write_tiktoken_model(str(root / "tiktoken"), num_ranks=300),
    }


def _stopping_model(tokenizer):
    """A model whose every greedy step is the family's end-of-turn token: the layers add nothing,
    every token embeds to one vector u, and only the end-of-turn row of the head points along u."""
    from llama_jax.config import ModelConfig

    vocab = max(320, tokenizer.vocab_size)
    cfg = ModelConfig(
        dim=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        head_dim=16,
        ffn_dim=128,
        vocab_size=vocab,
        max_seq_len=128,
    )
    rng = np.random.default_rng(0)
    u = rng.normal(size=cfg.dim).astype(np.float32)
    stop = tokenizer.eot_id if tokenizer.family == "llama3" else tokenizer.eos_id
    zeros = lambda *shape: np.zeros(shape, np.float32)  # noqa: E731
    layers = {
        "attention": {
            "wq": rng.normal(size=(2, 64, 4, 16)).astype(np.float32),
            "wk": rng.normal(size=(2, 64, 2, 16)).astype(np.float32),
            "wv": rng.normal(size=(2, 64, 2, 16)).astype(np.float32),
            "wo": zeros(2, 4, 16, 64),
        },
        "attention_norm": {"weight": np.ones((2, 64), np.float32)},
        "feed_forward": {"w1": zeros(2, 64, 128), "w2": zeros(2, 128, 64), "w3": zeros(2, 64, 128)},
        "ffn_norm": {"weight": np.ones((2, 64), np.float32)},
    }
    output = zeros(64, vocab)
    output[:, stop] = u
    params = {
        "layers": layers,
        "norm": {"weight": np.ones(64, np.float32)},
        "output": output,
        "tok_embeddings": np.tile(u, (vocab, 1)),
    }
    return cfg, params, stop


@pytest.mark.parametrize("family", ["llama2", "llama3"])
def test_transformers_tools_use_an_export_as_is(tokenizer_files, tmp_path, family):
    from llama_jax.chat_template import encode_chat
    from llama_jax.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_files[family])
    cfg, params, stop = _stopping_model(tokenizer)
    out = save_hf(params, cfg, tmp_path / "export", tokenizer=tokenizer)

    # AutoTokenizer gives our ids, BOS included, and decodes them back.
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    for text in ["hello world", " two  spaces", "def f(x):\n    return x  # ok", "ünïcödé 123456", ""]:
        assert hf_tokenizer(text).input_ids == tokenizer.encode(text, bos=True), text
        assert hf_tokenizer.decode(tokenizer.encode(text)) == tokenizer.decode(tokenizer.encode(text))
    # Its chat template renders the family's format to the ids encode_chat gives.
    dialog = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": " What is 2 + 2? "},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": "And 3 + 3?"},
    ]
    dialogs = [dialog]
    if family == "llama3":  # a Llama 3.1 tool call and its result
        dialogs.append(
            [
                {"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": '<|python_tag|>brave_search.call(query="Paris weather")'},
                {"role": "tool", "content": '{"temp": 21}'},
            ]
        )
    for messages in dialogs:
        rendered = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        rendered = rendered["input_ids"] if hasattr(rendered, "keys") else rendered
        assert list(rendered) == encode_chat(tokenizer, messages, add_generation_prompt=True).ids

    # The special ids are where transformers looks for them, and generation stops at end of turn.
    config = json.loads((out / "config.json").read_text())
    generation = json.loads((out / "generation_config.json").read_text())
    stops = list(tokenizer.stop_ids) if family == "llama3" else tokenizer.eos_id
    assert config["bos_token_id"] == tokenizer.bos_id and generation["eos_token_id"] == stops
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    prompt = hf_tokenizer("hello", return_tensors="pt").input_ids
    generated = model.generate(prompt, max_new_tokens=20, do_sample=False)[0].tolist()
    assert generated == prompt[0].tolist() + [stop]
    pipe = transformers.pipeline("text-generation", model=str(out), device="cpu")
    assert pipe("hello", max_new_tokens=20, do_sample=False)[0]["generated_text"] == "hello"


def test_a_tokenizer_larger_than_the_model_writes_nothing(tokenizer_files, tmp_path):
    from llama_jax.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_files["llama3"])
    cfg, params, _ = _stopping_model(tokenizer)
    small = cfg.replace(vocab_size=300)
    params = {**params, "output": params["output"][:, :300], "tok_embeddings": params["tok_embeddings"][:300]}
    with pytest.raises(ConversionError, match="has 556 tokens but the model's vocabulary is 300"):
        save_hf(params, small, tmp_path / "export", tokenizer=tokenizer)
    assert not (tmp_path / "export").exists() and list(tmp_path.iterdir()) == []
