"""Every command-line entry point answers --help with its usage and exit status 0 (argparse formats
help texts with %, so a literal percent sign in one breaks --help of the whole command)."""

import importlib
from pathlib import Path

import pytest

import llama_jax

COMMANDS = [
    "llama_jax.aot",
    "llama_jax.average",
    "llama_jax.convert.cli",
    "llama_jax.data.curate",
    "llama_jax.data.prepare",
    "llama_jax.eval",
    "llama_jax.generate",
    "llama_jax.ghost_attention",
    "llama_jax.judge",
    "llama_jax.model",
    "llama_jax.posttrain.rounds",
    "llama_jax.rejection_sample",
    "llama_jax.scaling.cli",
    "llama_jax.serve",
    "llama_jax.train",
]


@pytest.mark.parametrize("module", COMMANDS)
def test_help_prints_usage_and_exits_0(module, capsys):
    main = importlib.import_module(module).main
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage:") and "--help" in out


def test_every_entry_point_is_listed():
    package = Path(llama_jax.__file__).parent
    found = {
        ".".join(("llama_jax", *path.relative_to(package).with_suffix("").parts))
        for path in package.rglob("*.py")
        if "\ndef main(" in path.read_text()
    }
    assert found == set(COMMANDS)
