"""Throughput and MFU, and where metrics go: metrics.jsonl and TensorBoard event files.

MFU = tokens/s x (6N + 12 L H Q T) / peak (PaLM appendix B; docs/reference.md, "MFU"), with N the
non-embedding parameters plus the LM head.
"""

from __future__ import annotations

import functools
import json
import math
import struct
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from llama_jax.config import ModelConfig
from llama_jax.model import count_params

# Dense bf16 peak per chip, TFLOP/s, by a substring of `device_kind` (more specific first).
PEAK_TFLOPS = (
    ("v6 lite", 918.0),
    ("v6e", 918.0),
    ("v5 lite", 197.0),
    ("v5e", 197.0),
    ("v5p", 459.0),
    ("v5", 459.0),
    ("v4", 275.0),
    ("h200", 989.0),
    ("h100", 989.0),
)


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6N for the matmuls plus 12 L H Q T for attention."""
    n = count_params(cfg) - (0 if cfg.tie_embeddings else cfg.vocab_size * cfg.dim)
    return 6.0 * n + 12.0 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq_len


@functools.cache
def measured_cpu_peak(size: int = 1024, repeats: int = 8) -> float:
    """FLOP/s of the host's best fp32 matmul, timed once: the CPU's stand-in for a peak."""
    a = jnp.ones((size, size), jnp.float32)
    matmul = jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2.0 * size**3 / best


def peak_flops_per_second() -> tuple[float, str]:
    """(peak FLOP/s of all devices together, where the figure comes from)."""
    devices = jax.devices()
    kind = devices[0].device_kind.lower()
    if devices[0].platform == "cpu":
        # Simulated CPU devices share the same cores: the host is one "chip".
        return measured_cpu_peak(), "measured fp32 matmul on this CPU"
    for key, tflops in PEAK_TFLOPS:
        if key in kind:
            return tflops * 1e12 * len(devices), f"{tflops:g} TFLOP/s x {len(devices)} {kind}"
    return float("nan"), f"unknown peak for {kind}"


class MetricsWriter:
    """Appends one JSON object per logged step to WORKDIR/metrics.jsonl and mirrors scalars to
    TensorBoard event files in WORKDIR.

    `start`: the step the run resumes from; TensorBoard then discards what earlier event files hold
    after it (a resumed run logs those steps again), as `drop_after` does for metrics.jsonl."""

    def __init__(self, workdir: str | Path, enabled: bool = True, start: int = 0):
        self.enabled = enabled
        self.workdir = Path(workdir)
        self.path = self.workdir / "metrics.jsonl"
        self._tensorboard = None
        if enabled:
            from tensorboardX import SummaryWriter

            self.workdir.mkdir(parents=True, exist_ok=True)
            self._tensorboard = SummaryWriter(str(workdir), purge_step=start or None)

    def drop_after(self, step: int) -> int:
        """Forgets rows past `step` (a resumed run logs those steps again) and lines that are not
        JSON (a row torn by a kill or a full disk); returns how many torn lines it dropped."""
        if not self.enabled or not self.path.exists():
            return 0
        rows, torn = [], 0
        for line in self.path.read_text(errors="replace").splitlines():
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                keep = int(row["step"]) <= step
            except (ValueError, KeyError, TypeError):
                torn += 1
                continue
            if keep:
                rows.append(line)
        self.path.write_text("".join(row + "\n" for row in rows))
        return torn

    def write(self, step: int, metrics: dict) -> None:
        """One row; a non-finite value is written as null, so that the file stays strict JSON."""
        if not self.enabled:
            return
        values = {k: float(v) for k, v in metrics.items()}
        row = {"step": int(step), **{k: v if math.isfinite(v) else None for k, v in values.items()}}
        with self.path.open("a") as file:
            file.write(json.dumps(row, allow_nan=False) + "\n")
        for key, value in values.items():
            self._tensorboard.add_scalar(key, value, step)
        self._tensorboard.flush()

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()


# An event file is a sequence of TFRecords: u64 length, u32 masked CRC-32C of the length, the
# payload, u32 masked CRC-32C of the payload.
_RECORD_HEADER = struct.Struct("<QI")


def repair_event_files(workdir: str | Path) -> list[tuple[Path, int]]:
    """Cuts every TensorBoard event file in `workdir` back to its last whole record (a kill or a
    full disk can leave one torn, and TensorBoard stops reading a file at the tear); returns
    (file, bytes cut) for each file it shortened."""
    from tensorboardX.record_writer import masked_crc32c

    repaired = []
    for path in sorted(Path(workdir).glob("events.out.tfevents.*")):
        data = path.read_bytes()
        good, last = 0, None  # the end of the last whole record, and where that record starts
        while good + _RECORD_HEADER.size <= len(data):
            length, length_crc = _RECORD_HEADER.unpack_from(data, good)
            end = good + _RECORD_HEADER.size + length + 4
            if masked_crc32c(data[good : good + 8]) != length_crc or end > len(data):
                break
            good, last = end, good
        if last is not None and good == len(data):
            # Only the final record's payload is checked byte by byte: a tear is always at the end.
            payload = data[last + _RECORD_HEADER.size : good - 4]
            if masked_crc32c(payload) != struct.unpack_from("<I", data, good - 4)[0]:
                good = last
        if good < len(data):
            with path.open("r+b") as file:
                file.truncate(good)
            repaired.append((path, len(data) - good))
    return repaired
