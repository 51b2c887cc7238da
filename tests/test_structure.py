"""The house rules that tools check: the import layers and no circles (import-linter contracts in
setup.cfg), one style (ruff format and lint, configured in pyproject.toml), and no citation of a
document outside the repository."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LINT_IMPORTS = (
    "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
)


def _lint_imports(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", LINT_IMPORTS, "--no-cache"],
        cwd=root,
        env={"PYTHONPATH": str(root), "PATH": ""},
        capture_output=True,
        text=True,
    )


def test_import_contracts_are_kept():
    result = _lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 kept, 0 broken" in result.stdout


def test_an_import_against_the_layers_breaks_the_contracts(tmp_path):
    """The contracts can fail: the loop importing a post-training stage is a circle (the stage
    imports the loop) and an import from a higher layer."""
    shutil.copytree(ROOT / "llama_jax", tmp_path / "llama_jax", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "setup.cfg", tmp_path / "setup.cfg")
    trainer = tmp_path / "llama_jax" / "trainer.py"
    trainer.write_text(
        trainer.read_text() + "\n\ndef _stage():\n    import llama_jax.posttrain.ppo  # noqa\n"
    )
    result = _lint_imports(tmp_path)
    assert result.returncode != 0
    assert re.search(r"Layers: .* BROKEN", result.stdout.replace("\n", " "))
    assert re.search(r"No import circles .* BROKEN", result.stdout.replace("\n", " "))
    assert "llama_jax.trainer -> llama_jax.posttrain.ppo" in result.stdout


def test_the_tree_is_formatted_and_linted():
    check = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "."], cwd=ROOT, capture_output=True, text=True
    )
    assert check.returncode == 0, check.stdout
    fmt = subprocess.run(
        [sys.executable, "-m", "ruff", "format", "--check", "."], cwd=ROOT, capture_output=True, text=True
    )
    assert fmt.returncode == 0, fmt.stdout


def test_every_cited_document_is_in_the_repository():
    cited = set()
    for path in [
        *ROOT.glob("llama_jax/**/*.py"),
        *ROOT.glob("experiments/*.py"),
        *ROOT.glob("tests/*.py"),
        ROOT / "README.md",
    ]:
        cited |= set(re.findall(r"\b(docs/[\w./-]+\.md)\b", path.read_text()))
        cited |= {f"{name}.md" for name in re.findall(r"\b([A-Z][A-Z_]+)\.md\b", path.read_text())}
    missing = sorted(c for c in cited if not (ROOT / c).is_file() and not list(ROOT.rglob(Path(c).name)))
    assert cited and not missing, missing


def test_a_host_without_accelerators_starts_jax_without_libtpu_noise():
    """With the tpu extra installed, libtpu probes for a TPU at backend start and prints a page of
    warnings on a host without one; importing llama_jax there selects the CPU backend first."""
    import os
    import subprocess
    import sys

    import llama_jax

    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    probe = "import llama_jax, jax, os; print(os.environ.get('JAX_PLATFORMS'), jax.devices()[0].platform)"
    result = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    if llama_jax._no_accelerator():
        assert result.stdout.split() == ["cpu", "cpu"]
        assert "TPU" not in result.stderr and "libtpu" not in result.stderr, result.stderr
    else:  # an accelerator host: left to JAX
        assert result.stdout.split()[0] == "None"
