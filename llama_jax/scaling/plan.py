"""The FLOPs model and the IsoFLOP planner.

Training FLOPs per token are `llama_jax.metrics.flops_per_token`: 6N + 12 L H Q T (PaLM appendix
B, docs/reference.md, "Scaling laws"), with N the non-embedding parameters plus the LM head, so a run of D tokens costs
C = flops_per_token x D. For each compute budget C and each model size the planner gives the number
of steps that spends C at a fixed batch: an IsoFLOP sweep trades parameters for tokens.

Model sizes are written DIMxLAYERS (e.g. 128x2), members of a family grown from the `tiny` preset:
its head size (32; a narrower model has one head of its own width), context and RoPE; dim / 32
query heads, half as many KV heads (when even, as in tiny), and Meta's SwiGLU width rounded up to a
multiple of min(dim, 256), so that 256x4 with tiny's vocabulary of 4096 is exactly `tiny`.

The vocabulary is a choice of the sweep. Below a million parameters the LM head (vocabulary x dim)
is most of N, and on the standard-library corpus the compute-optimal model at 1e12 FLOPs has about
55K parameters (a pilot sweep: a 512-token vocabulary, 16 x 128 tokens a step). With tiny's 4096
tokens even a model of width 32 has a 131K-parameter head, and in a pilot at 1e12 FLOPs the
smallest model of the grid (32x1) won: no IsoFLOP minimum within CPU budgets.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path
from typing import Mapping, Sequence

from llama_jax.config import ModelConfig, ffn_dim_for, model_preset
from llama_jax.metrics import flops_per_token  # 6N + 12 L H Q T, the figure MFU uses
from llama_jax.scaling import ScalingError

PLAN_FILE = "plan.json"

# The default grid, vocabulary and step shape. One layer throughout: mixing depths put the runs of
# a pilot sweep on different curves (a zig-zag of up to 0.1 nats at 2.5e11 FLOPs). A budget's runs
# should straddle its optimum: the demo takes four neighbours from this list per budget.
DEFAULT_SIZES = ("8x1", "16x1", "32x1", "64x1", "96x1")
DEFAULT_VOCAB = 512
DEFAULT_BATCH_SIZE, DEFAULT_SEQ_LEN = 16, 128

# Candidates for a single compute-optimal run (the check of a prediction), smallest first.
LADDER = (
    "8x1",
    "16x1",
    "24x1",
    "32x1",
    "64x1",
    "96x1",
    "128x1",
    "160x1",
    "192x1",
    "256x1",
    "320x1",
    "384x1",
    "512x1",
)


@dataclasses.dataclass(frozen=True)
class PlannedRun:
    """One training run of a sweep: a model size trained for `steps` steps at a budget."""

    name: str
    budget: float  # the IsoFLOP budget this run belongs to, FLOPs
    size: str  # DIMxLAYERS
    vocab_size: int
    params: int  # N: non-embedding parameters plus the LM head
    flops_per_token: float  # 6N + 12 L H Q T
    steps: int
    tokens: int  # steps x batch_size x seq_len
    flops: float  # flops_per_token x tokens (the budget, up to rounding the steps)


@dataclasses.dataclass(frozen=True)
class Plan:
    batch_size: int  # sequences per step
    seq_len: int
    runs: tuple[PlannedRun, ...]
    skipped: tuple[str, ...] = ()  # budget/size pairs left out, with the reason

    @property
    def budgets(self) -> list[float]:
        return sorted({run.budget for run in self.runs})


def parse_size(size: str) -> tuple[int, int]:
    """ "128x2" -> (dim 128, 2 layers)."""
    match = re.fullmatch(r"\s*(\d+)\s*x\s*(\d+)\s*", size)
    if not match:
        raise ScalingError(f"Model size {size!r} is not of the form DIMxLAYERS (e.g. 128x2).")
    dim, layers = int(match[1]), int(match[2])
    head_dim = model_preset("tiny").head_dim
    narrow = 8 <= dim < head_dim and dim % 2 == 0  # one head as wide as the model
    if layers <= 0 or not (narrow or (dim > 0 and dim % head_dim == 0)):
        raise ScalingError(
            f"Model size {size!r} needs a positive number of layers and a width that "
            f"is a multiple of the head size {head_dim} (or an even width from 8 to "
            f"{head_dim - 2}, one head)."
        )
    return dim, layers


def model_for_size(size: str, vocab_size: int | None = None) -> ModelConfig:
    """The member DIMxLAYERS of the tiny family (see the module docstring); the vocabulary is
    tiny's unless given."""
    dim, layers = parse_size(size)
    tiny = model_preset("tiny")
    vocab_size = tiny.vocab_size if vocab_size is None else vocab_size
    if vocab_size < 16:
        raise ScalingError(f"The vocabulary size must be at least 16, got {vocab_size}.")
    head_dim = min(dim, tiny.head_dim)
    n_heads = dim // head_dim
    n_kv_heads = n_heads // 2 if n_heads % 2 == 0 else n_heads
    return tiny.replace(
        dim=dim,
        n_layers=layers,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        head_dim=head_dim,
        ffn_dim=ffn_dim_for(dim, min(dim, 256)),
        vocab_size=vocab_size,
    )


def scaling_params(cfg: ModelConfig) -> int:
    """N of the FLOPs model: non-embedding parameters plus the LM head (untied models)."""
    return cfg.num_params(include_embeddings=False)


def run_name(budget: float, size: str) -> str:
    return f"C{budget:.3g}_{size}".replace("+", "")


def check_budgets(budgets: Sequence[float]) -> list[float]:
    budgets = [float(b) for b in budgets]
    if not budgets:
        raise ScalingError("Give at least one compute budget.")
    for budget in budgets:
        if not (budget > 0 and math.isfinite(budget)):
            raise ScalingError(f"Compute budgets must be positive FLOPs, got {budget:g}.")
    return sorted(set(budgets))


def plan_run(
    budget: float,
    size: str,
    batch_size: int,
    seq_len: int,
    vocab_size: int,
    name: str | None = None,
    min_steps: int = 1,
) -> PlannedRun:
    """The run of model `size` that spends `budget` FLOPs at `batch_size` x `seq_len` tokens a
    step (steps rounded to the nearest integer, at least `min_steps`)."""
    if batch_size < 1 or seq_len < 1:
        raise ScalingError(
            f"The batch size and sequence length must be positive, got {batch_size} and {seq_len}."
        )
    cfg = model_for_size(size, vocab_size)
    if seq_len > cfg.max_seq_len:
        raise ScalingError(
            f"The sequence length {seq_len} is longer than the family's context of {cfg.max_seq_len}."
        )
    per_token = flops_per_token(cfg, seq_len)
    tokens_per_step = batch_size * seq_len
    steps = max(min_steps, round(budget / (per_token * tokens_per_step)))
    tokens = steps * tokens_per_step
    return PlannedRun(
        name=name or run_name(budget, size),
        budget=budget,
        size=size,
        vocab_size=vocab_size,
        params=scaling_params(cfg),
        flops_per_token=per_token,
        steps=steps,
        tokens=tokens,
        flops=per_token * tokens,
    )


def plan_isoflop(
    budgets: Sequence[float],
    sizes: Sequence[str] | Mapping[float, Sequence[str]],
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    seq_len: int = DEFAULT_SEQ_LEN,
    vocab_size: int = DEFAULT_VOCAB,
    min_steps: int = 10,
) -> Plan:
    """Every (budget, size) pair as a run, with the same sizes for every budget or, given a
    mapping, each budget's own (as Llama 3 chose them around each optimum). Pairs that would
    train fewer than `min_steps` steps are skipped (listed in `Plan.skipped`)."""
    budgets = check_budgets(budgets)
    per_budget = sizes if isinstance(sizes, Mapping) else {budget: sizes for budget in budgets}
    if set(per_budget) != set(budgets):
        raise ScalingError("The sizes given per budget must name exactly the budgets planned.")
    if not all(per_budget.values()):
        raise ScalingError("Give at least one model size for every budget.")
    runs, skipped = [], []
    for budget in budgets:
        for size in per_budget[budget]:
            run = plan_run(budget, size, batch_size, seq_len, vocab_size, min_steps=0)
            if run.steps < min_steps:
                skipped.append(f"{run.name}: {run.steps} steps < {min_steps}")
            else:
                runs.append(run)
    if not runs:
        raise ScalingError(
            f"No budget/size pair trains for at least {min_steps} steps; raise the "
            "budgets or use smaller models."
        )
    return Plan(batch_size=batch_size, seq_len=seq_len, runs=tuple(runs), skipped=tuple(skipped))


def nearest_size(
    flops_per_token_target: float, seq_len: int, vocab_size: int, sizes: Sequence[str] = LADDER
) -> str:
    """The size whose FLOPs per token is closest (in ratio) to the target: the model that
    trains on the optimal tokens D* with the budget C is the one of C / D* FLOPs per token."""

    def distance(size):
        per_token = flops_per_token(model_for_size(size, vocab_size), seq_len)
        return abs(math.log(per_token / flops_per_token_target))

    return min(sizes, key=distance)


def write_plan(plan: Plan, directory: str | Path) -> Path:
    path = Path(directory) / PLAN_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {
        "batch_size": plan.batch_size,
        "seq_len": plan.seq_len,
        "runs": [dataclasses.asdict(run) for run in plan.runs],
        "skipped": list(plan.skipped),
    }
    path.write_text(json.dumps(body, indent=1) + "\n")
    return path


def read_plan(directory: str | Path) -> Plan:
    path = Path(directory) / PLAN_FILE
    if not path.is_file():
        raise ScalingError(
            f"{path} does not exist; write one with `python -m llama_jax.scaling plan --out {directory}`."
        )
    try:
        body = json.loads(path.read_text())
        runs = tuple(PlannedRun(**run) for run in body["runs"])
        return Plan(
            batch_size=int(body["batch_size"]),
            seq_len=int(body["seq_len"]),
            runs=runs,
            skipped=tuple(body.get("skipped", ())),
        )
    except (ValueError, KeyError, TypeError) as err:
        raise ScalingError(f"{path} is not a plan written by this tool ({err}).") from None
