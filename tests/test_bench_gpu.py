"""The GPU benchmark's script runs end to end at a toy size on this CPU (the GPU figures need a
GPU; this proves the prepared command works before one is lent)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_smoke_run_prints_a_row_per_system():
    script = Path(__file__).parent.parent / "experiments" / "bench_gpu.py"
    done = subprocess.run(
        [sys.executable, str(script), "--smoke"], capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stderr[-2000:]
    table = done.stdout.split("| model | system |")[1]
    rows = re.findall(r"\| tiny:2 \| ([^|]+) \| ([\d,]+) \| ([\d.,]+) \| ([\d.]+)% \|", table)
    assert [system.strip() for system, *_ in rows] == ["llama_jax, xla attention", "PyTorch, sdpa"]
    for _, tokens_per_s, _, mfu in rows:
        assert float(tokens_per_s.replace(",", "")) > 0 and 0 < float(mfu) < 100
