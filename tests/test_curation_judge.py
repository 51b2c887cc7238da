"""`python -m llama_jax.judge`: a model's yes/no judgement of a sample, against transformers."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import torch
import transformers

from llama_jax import judge
from llama_jax.convert import save_hf
from llama_jax.tokenizer import load_tokenizer

PROMPT = "Good text? {text}\nAnswer:"
TEXTS = [
    "the cat sat on the mat and looked at the door for a long time",
    "buy now buy now cheap cheap cheap",
    "rivers run to the sea under grey skies in winter",
    "1 2 3 4 5 6 7 8 9",
    "a letter came in the morning from an old friend",
    "zz zz zz",
]


def test_judge_labels_the_hash_sample_with_the_models_yes_probability(small_checkpoint, tmp_path, capsys):
    ckpt, tokenizer_path, cfg, params = small_checkpoint
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    config = tmp_path / "curate.yaml"
    config.write_text(f"inputs: [{{path: {corpus}}}]\noutput: {tmp_path / 'out'}\nstages: [heuristics]\n")
    (tmp_path / "prompt.txt").write_text(PROMPT)
    labels = tmp_path / "labels.jsonl"
    args = [config, "--ckpt", ckpt, "--tokenizer", tokenizer_path, "--output", labels, "--sample", "4"]
    args += ["--prompt", tmp_path / "prompt.txt", "--max-text-tokens", "8", "--batch-size", "3"]
    assert judge.main([str(a) for a in args]) == 0, capsys.readouterr().err
    got = {r["id"]: r["label"] for r in map(json.loads, labels.read_text().splitlines())}

    # The sample: the four ids with the smallest 8-byte BLAKE2b hashes, as the classifier stages take.
    ids = [f"{corpus}#{i:010d}" for i in range(len(TEXTS))]
    by_hash = sorted(
        ids, key=lambda i: int.from_bytes(hashlib.blake2b(i.encode(), digest_size=8).digest(), "little")
    )
    assert sorted(got) == sorted(by_hash[:4])

    # The reference: transformers on the same weights, log p(" yes") and log p(" no") after the prompt.
    tokenizer = load_tokenizer(tokenizer_path)
    hf_dir = save_hf(params, cfg, tmp_path / "hf", tokenizer=tokenizer)
    model = transformers.LlamaForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32).eval()

    def logprob(context: str, answer: str) -> float:
        context_ids = tokenizer.encode(context, bos=True)
        ids = tokenizer.encode(context + " " + answer, bos=True)
        with torch.no_grad():
            logits = model(torch.tensor([ids[:-1]])).logits[0].double().log_softmax(-1).numpy()
        return float(sum(logits[t - 1, ids[t]] for t in range(len(context_ids), len(ids))))

    for doc_id, label in got.items():
        text = TEXTS[int(doc_id.rsplit("#", 1)[1])]
        shown = tokenizer.decode(tokenizer.encode(text)[:8])
        context = PROMPT.format(text=shown)
        expected = 1 / (1 + np.exp(logprob(context, "no") - logprob(context, "yes")))
        assert abs(label - expected) < 1e-4, (doc_id, label, expected)

    # A second run never writes over the labels; a prompt without {text} is one sentence.
    assert judge.main([str(a) for a in args]) == 2
    assert "already exists" in capsys.readouterr().err
    (tmp_path / "prompt.txt").write_text("no placeholder")
    args[6] = tmp_path / "other.jsonl"
    assert judge.main([str(a) for a in args]) == 2
    err = capsys.readouterr().err
    assert "must contain {text}" in err and len(err.strip().splitlines()) == 1
