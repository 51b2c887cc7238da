"""HF -> llama_jax streams: peak resident memory is the output plus about one tensor, not the
input model plus the output.

Measured in a fresh process: after a warm-up conversion (imports, thread pools), the kernel's
peak-RSS counter is reset (`/proc/self/clear_refs` = 5) and VmHWM read after the conversion.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
MB = 2**20

MEASURE = """
import json, sys
from llama_jax.convert import load_hf, write_params

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024

small, big, out = sys.argv[1:4]
load_hf(small, progress=False)
open("/proc/self/clear_refs", "w").write("5")
base = status("VmRSS:")
cfg, params = load_hf(big, progress=False)
read_peak = status("VmHWM:") - base
write_params("llama_jax", params, cfg, out)
print(json.dumps({"read": read_peak, "read_and_write": status("VmHWM:") - base}))
"""


def test_hf_to_llama_jax_peak_memory(hf_model_dir, tmp_path):
    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("needs Linux's /proc/self/clear_refs to reset the peak-RSS counter")
    _, small = hf_model_dir(seed=1)
    # About 40 MB in fp32, the largest tensors (embedding, LM head) 16 MB each.
    _, big = hf_model_dir(hidden_size=256, intermediate_size=688, vocab_size=16384, num_key_value_heads=2)
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
    done = subprocess.run(
        [sys.executable, "-c", MEASURE, str(small), str(big), str(tmp_path / "out")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    peak = json.loads(done.stdout.strip().splitlines()[-1])
    output = (big / "model.safetensors").stat().st_size  # fp32 in, fp32 out
    largest = 16384 * 256 * 4
    print(
        f"\noutput {output / MB:.1f} MB, largest tensor {largest / MB:.1f} MB; peak RSS growth: "
        f"load_hf {peak['read'] / MB:.1f} MB, load_hf + save_params "
        f"{peak['read_and_write'] / MB:.1f} MB"
    )
    assert peak["read"] < output + largest + 8 * MB
