"""The README's "Starting from released weights" walkthrough, command for command, on a toy
download laid out as Hugging Face's: generate from it, continue pretraining, fine-tune on chats,
export to Hugging Face and Meta's format, and use the export with transformers' pipeline.

Marked `slow` (about two minutes of real runs): `.ci/run` runs it after the suite."""

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from llama_jax.config import ModelConfig
from llama_jax.convert import save_hf
from llama_jax.data.synthetic import random_documents, write_tiktoken_model
from llama_jax.model import init_params
from llama_jax.tokenizer import load_tokenizer

README = Path(__file__).resolve().parent.parent / "README.md"
# Toy sizes for the README's recipes (the commands are the README's; these only shrink the runs).
SMALL = ["train.steps=2", "train.batch_size=8", "train.seq_len=32", "train.log_every=1", "eval_data=null"]


def _readme_commands() -> list[str]:
    section = README.read_text().split("## Starting from released weights", 1)[1].split("\n## ", 1)[0]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    lines = [line for line in block.replace("\\\n", " ").splitlines() if line and not line.startswith("#")]
    return [" ".join(line.split()) for line in lines]


def _download(root: Path) -> Path:
    """A toy Llama 3 download: config.json, safetensors, tokenizer.json and tokenizer_config.json,
    generation_config.json, and Meta's tiktoken file at original/tokenizer.model."""
    tokenizer = load_tokenizer(write_tiktoken_model(str(root / "tok"), num_ranks=300))
    cfg = ModelConfig(
        dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=192, vocab_size=556,
        max_seq_len=256, rope_theta=500000.0,
    )  # fmt: skip
    download = root / "Llama-toy"
    save_hf(jax.device_get(init_params(cfg, jax.random.key(0))), cfg, download, tokenizer=tokenizer)
    (download / "original").mkdir()
    shutil.copy(tokenizer.path, download / "original" / "tokenizer.model")
    return download


@pytest.mark.slow
def test_the_readme_walkthrough_runs_as_written(tmp_path):
    download = _download(tmp_path)
    (tmp_path / "my_corpus").mkdir()
    for i, text in enumerate(random_documents(40, seed=1)):
        (tmp_path / "my_corpus" / f"{i}.txt").write_text(text)
    chats = [
        {"messages": [{"role": "user", "content": f"Say {w}."}, {"role": "assistant", "content": w}]}
        for w in random_documents(32, seed=2)
    ]
    (tmp_path / "chats.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats))

    ours = {  # the README's commands with the toy download and toy sizes
        "generate": f"python -m llama_jax.generate --hf {download} --prompt 'The capital of France is' "
        "--max-new-tokens 4",
        "cpt": f"python -m llama_jax.train --exp=tiny init_from={download} model=from_init "
        f"data.sources.0.path=my_corpus/ --workdir runs/cpt {' '.join(SMALL)}",
        "sft": "python -m llama_jax.train --exp=tiny_sft init_from=runs/cpt model=from_init "
        f"data.sources.0.path=chats.jsonl --workdir runs/sft {' '.join(SMALL)}",
        "to_hf": "python -m llama_jax.convert --from llama_jax runs/sft --to hf out/hf --dtype bfloat16",
        "to_meta": "python -m llama_jax.convert --from llama_jax runs/sft --to meta out/meta --shards 2",
        "pipeline": "python -c \"import transformers; p = transformers.pipeline('text-generation', "
        "model='out/hf'); print(p([{'role': 'user', 'content': 'Hi!'}], max_new_tokens=32)[0]"
        "['generated_text'])\"",
    }
    readme = _readme_commands()
    assert len(readme) == len(ours)
    for written, (name, command) in zip(readme, ours.items()):
        # The same program and the same flags and settings, in the README's order.
        keys = lambda c: [w.split("=")[0] for w in shlex.split(c) if w.startswith("-") or "=" in w]  # noqa: E731
        readme_keys, our_keys = keys(written), keys(command)
        assert shlex.split(written)[:3] == shlex.split(command)[:3], name
        assert [k for k in our_keys if k in readme_keys] == readme_keys, (name, written)

    outputs = {}
    for name, command in ours.items():
        argv = [sys.executable if w == "python" else w for w in shlex.split(command)]
        result = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, f"{name}: {result.stderr[-3000:]}"
        assert "Traceback" not in result.stderr, name
        outputs[name] = result.stdout
    assert outputs["generate"].startswith("The capital of France is")
    print("pipeline on the export:", outputs["pipeline"].strip()[:300])
    recorded = json.loads((tmp_path / "runs/cpt/experiment.json").read_text())
    assert recorded["model"]["rope_theta"] == 500000.0 and recorded["model"]["ffn_dim"] == 192
    assert recorded["data"]["tokenizer_path"] == str(download / "original" / "tokenizer.model")
    assert sorted(p.name for p in (tmp_path / "out/meta").glob("consolidated.*.pth")) == [
        "consolidated.00.pth",
        "consolidated.01.pth",
    ]
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (tmp_path / "out/hf" / name).is_file()
    assert re.search(r"<\|start_header_id\|>assistant<\|end_header_id\|>", outputs["pipeline"]) is None
