"""The Colab notebook runs top to bottom on CPU (nbclient), with its parameters scaled down."""

import json
from pathlib import Path

import nbclient
import nbformat
import pytest

NOTEBOOK = Path(__file__).parent.parent / "experiments" / "colab.ipynb"


def _outputs(cell) -> str:
    return "".join(
        o.get("text", "") + "".join(o.get("data", {}).get("text/plain", "")) for o in cell.get("outputs", [])
    )


@pytest.mark.slow  # the whole notebook in a kernel: after the suite
def test_colab_notebook_runs_on_cpu(tmp_path, hf_model_dir, monkeypatch):
    _, hf_dir = hf_model_dir(seed=0)
    # The kernel inherits this environment: one CPU device, a private tokenizer cache.
    monkeypatch.setenv("XLA_FLAGS", "")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("LLAMA_JAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    [parameters] = [c for c in notebook.cells if "parameters" in c.metadata.get("tags", [])]
    parameters.source = "\n".join(
        [
            'REPO = ""',
            "TRAIN_STEPS = 6",
            f"WORKDIR = {str(tmp_path / 'run')!r}",
            'PROMPT = "def "',
            f"HF_DIR = {str(hf_dir)!r}",
            'AOT_EXPERIMENT = "tiny"',
            'AOT_TOPOLOGY = "v5p-8"',
            "AOT_OVERRIDES = ['train.batch_size=8']",
        ]
    )
    nbclient.NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()

    text = "\n".join(_outputs(c) for c in notebook.cells if c.cell_type == "code")
    assert "eval loss" in text and "CpuDevice" in text, text
    steps = [
        json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    assert max(steps) == 6
    generated = [_outputs(c) for c in notebook.cells if "generate(" in c.source][0]
    assert generated.startswith("def ") and len(generated.strip()) > len("def ")
    assert "2 layers, dim 64; logits (1, 16, " in text  # the conftest's HF model
    assert "fits: true" in text and "splash attention" in text
