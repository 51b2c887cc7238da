"""Compile an experiment's real train step for a TPU slice on a CPU-only host, before renting one.

    python -m llama_jax.aot --exp=llama2_70b --topology=v5p-512 [--slices 2] [--json out.json] [k=v ...]
    python -m llama_jax.aot --recipes [--check README.md] [--no-estimate]  # the README's table
    python -m llama_jax.aot --exp=llama3_1_8b --phase 8      # one phase of a run in phases

Needs `libtpu` (`pip install -e '.[tpu]'`), which lets XLA compile for a TPU topology described by
`jax.experimental.topologies` without the hardware. The same `compile_steps` as training lowers the
step with the same shardings and remat policy; the compiler's memory analysis gives per-device
bytes (arguments, outputs, temporaries) against the chip's HBM (a program that cannot fit is
refused by the compiler, and reported with its figure). XLA's cost analysis counts a loop body
once, so the step time and MFU come from two more compiles, of the step with one and with two
layers, unrolled, extrapolated to the model's depth (`estimate_step`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import sys
import time
from pathlib import Path

import jax

from llama_jax import collectives, lora_training, phases
from llama_jax.attention import compiling_for
from llama_jax.config import ConfigError, apply_overrides, list_experiments, load_experiment
from llama_jax.context_parallel import check_context_length
from llama_jax.metrics import PEAK_TFLOPS, flops_per_token
from llama_jax.optim import make_optimizer
from llama_jax.sharding import MeshError, activation_sharding, check_batch, make_mesh

GIB = 2**30
# HBM per chip, GiB, and how slice names count: TensorCores (v4, v5p: 2 per chip) or chips.
CHIPS = {"v4": (32, 2), "v5p": (95, 2), "v5e": (16, 1), "v5litepod": (16, 1), "v6e": (32, 1)}
_SHAPES_3D = {
    4: "2x2x1",
    8: "2x2x2",
    16: "2x2x4",
    32: "2x4x4",
    64: "4x4x4",
    128: "4x4x8",
    256: "4x8x8",
    512: "8x8x8",
    1024: "8x8x16",
    2048: "8x16x16",
    4096: "16x16x16",
}
_SHAPES_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}


@dataclasses.dataclass(frozen=True)
class Topology:
    name: str  # as users write it, e.g. "v5p-512"
    generation: str  # v4, v5p, v5e, v6e
    chips: int
    libtpu_name: str  # e.g. "v5p:8x8x8"

    @property
    def hbm_bytes_per_chip(self) -> int:
        return CHIPS[self.generation][0] * GIB


def parse_topology(name: str) -> Topology:
    """ "v5p-512" (TensorCores for v4/v5p, chips for v5e/v6e), "v5litepod-16", or "v5p:8x8x8"."""
    match = re.fullmatch(r"(v4|v5p|v5e|v5litepod|v6e)-(\d+)", name)
    if match:
        generation, count = match.group(1), int(match.group(2))
        chips = count // CHIPS[generation][1]
        shapes = _SHAPES_3D if generation in ("v4", "v5p") else _SHAPES_2D
        if chips not in shapes:
            raise ConfigError(
                f"Unknown slice size {name}; known: "
                f"{', '.join(f'{generation}-{c * CHIPS[generation][1]}' for c in shapes)}."
            )
        generation = "v5e" if generation == "v5litepod" else generation
        return Topology(name, generation, chips, f"{generation}:{shapes[chips]}")
    match = re.fullmatch(r"(v4|v5p|v5e|v6e):(\d+(?:x\d+)+)", name)
    if match:
        return Topology(name, match.group(1), math.prod(int(d) for d in match.group(2).split("x")), name)
    raise ConfigError(f"Unknown TPU topology {name!r}; write it as v5p-512, v5e-16, v6e-256 or v5p:8x8x8.")


def _peak_per_chip(device_kind: str) -> float:
    kind = device_kind.lower()
    return next(tflops for key, tflops in PEAK_TFLOPS if key in kind) * 1e12


def phase_of(exp, phase: int | None):
    """The experiment as its phase `phase` (counted from 1) trains it; `exp` itself for None."""
    if phase is None:
        return exp
    if not 1 <= phase <= len(exp.phases):
        have = f"phases 1 to {len(exp.phases)}" if exp.phases else "no phases"
        raise ConfigError(f"{exp.name} has {have}; --phase {phase} is not one of them.")
    return phases.phase_experiment(exp, phase - 1)


def _devices(topology: Topology, slices: int) -> list:
    """The devices of `slices` x `topology`, described by libtpu without the hardware."""
    from jax.experimental import topologies

    try:
        # One chip is less than libtpu's default host (2x2): say the host holds just that chip.
        single = {"chips_per_host_bounds": (1, 1, 1)} if topology.chips == 1 else {}
        description = topologies.get_topology_desc(
            platform="tpu", topology_name=topology.libtpu_name, num_slices=slices, **single
        )
    except Exception as err:  # libtpu missing or the name unknown to it
        raise ConfigError(
            f"Cannot describe TPU topology {topology.libtpu_name} ({str(err).splitlines()[0]}); "
            "is libtpu installed (pip install -e '.[tpu]')?"
        ) from None
    return list(description.devices)


def _on_tpu(exp, slices: int = 1):
    """exp as the TPU computes it: "auto" would resolve to fp32 on this CPU host, the TPU's is bf16.
    Across slices the layer loop is not unrolled: libtpu's SPMD partitioner aborts on an unrolled
    scan there (a failed IsManualSubgroup check, libtpu 0.0.42), and the unroll is a CPU setting."""
    model = exp.model
    if model.compute_dtype == "auto":
        model = model.replace(compute_dtype="bfloat16")
    if slices > 1 and model.scan_unroll > 1:
        model = model.replace(scan_unroll=1)
    return exp if model == exp.model else exp.replace(model=model)


def _lower(exp, whole, devices):
    """(mesh, lowered step) of exp's train step on `devices`; `whole` is the experiment exp is a
    phase of (its schedule spans every phase)."""
    from llama_jax.stages.pretrain import Pretrain

    mesh = make_mesh(exp.mesh, devices)
    check_batch(exp.train.batch_size, exp.train.microbatches, mesh)
    check_context_length(exp.train.seq_len, mesh, exp.mesh.rules)
    optimizer, schedule = make_optimizer(exp.optim, phases.total_steps(whole), phases.lr_segments(whole))
    # The recipes compiled here are pretraining runs, or SFT with LoRA: the same text batches and
    # next-token loss, with the frozen base as the step's extra input.
    stage, rules = Pretrain(), exp.mesh.rules
    shardings = stage.state_shardings(exp, optimizer, mesh)
    steps = stage.compile(exp, optimizer, schedule, mesh, shardings)
    state = stage.abstract_state(exp, optimizer, mesh, shardings)
    frozen = ()
    if lora_training.enabled(exp):
        frozen = ((lora_training.abstract_base(stage.module(exp), exp, mesh), None),)
    batch = {
        key: jax.ShapeDtypeStruct(shape, dtype, sharding=steps.batch_sharding[key])
        for key, (shape, dtype) in stage.batch_shapes(exp, exp.train.batch_size).items()
    }
    # The model's constraints resolve against this mesh; attention "auto" means the TPU's kernel.
    with activation_sharding(mesh, rules), compiling_for("tpu"):
        return mesh, steps.train_step.lower(state, batch, *frozen)


def compile_for_topology(
    exp, topology: Topology, slices: int = 1, phase: int | None = None, estimate: bool = False
) -> dict:
    """Compiles exp's train step (of phase `phase`, counted from 1, if given) for `slices` x
    `topology`; returns the report as a dict. With `estimate`, also the step time and MFU from
    unrolled one- and two-layer compiles (`estimate_step`)."""
    whole, exp = exp, _on_tpu(phase_of(exp, phase), slices)
    devices = _devices(topology, slices)
    start = time.perf_counter()
    mesh, lowered = _lower(exp, whole, devices)
    report = {
        "experiment": exp.name if phase is None else f"{exp.name} --phase {phase}",
        "seq_len": exp.train.seq_len,
        "topology": topology.name,
        "slices": slices,
        "devices": len(devices),
        "mesh": dict(mesh.shape),
        "remat": exp.model.remat,
        "rules": format_rules(exp.mesh.rules),
        "keep_logits": exp.train.keep_logits,
        # What keeping every chunk's fp32 logits for the backward pass costs (or costs now).
        "logits_bytes": kept_logits_bytes(exp, mesh),
    }
    try:
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as err:
        refusal = _refusal(err)
        if refusal is None:
            raise
        return {**report, **refusal, "compile_seconds": time.perf_counter() - start}
    report.update(_measured(topology, slices, mesh, lowered, compiled))
    report["compile_seconds"] = time.perf_counter() - start
    if estimate:
        report.update(estimate_step(exp, whole, devices, report["attention"]))
    return report


def _refusal(err) -> dict | None:
    """The TPU compiler refuses a program that cannot fit: its figures, or None for another error."""
    match = re.search(
        r"required for HLO temporaries \(([\d.]+)G\) exceeds available HBM \(([\d.]+)G\)",
        str(err),
    )
    if not match:
        return None
    temp, hbm = (float(g) * GIB for g in match.groups())
    return {
        "temp_bytes": temp,
        "hbm_bytes": hbm,
        "hbm_fraction": temp / hbm,
        "fits": False,
        "compiler_message": str(err).splitlines()[0][:300],
    }


def _cost(compiled) -> tuple[float, float]:
    """(FLOPs, optimal seconds) of the compiler's cost analysis of one device's program."""
    cost = compiled.cost_analysis() or {}
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", math.nan)), float(cost.get("optimal_seconds", math.nan))


def _measured(topology: Topology, slices: int, mesh, lowered, compiled) -> dict:
    """Memory per device and fit, the compiler's cost figures and the step's collectives."""
    devices = list(mesh.devices.flat)
    # Pallas kernels lower to Mosaic custom calls: this says whether splash attention is in the step.
    attention_kernel = "splash" if "tpu_custom_call" in lowered.as_text() else "xla"
    memory = compiled.memory_analysis()
    hbm = topology.hbm_bytes_per_chip * topology.chips * slices // len(devices)  # per device
    total = (
        memory.argument_size_in_bytes
        + memory.output_size_in_bytes
        + memory.temp_size_in_bytes
        - memory.alias_size_in_bytes
    )
    # XLA's cost analysis counts a while-loop body once (the layers and the microbatches are
    # scanned): these describe one body plus the rest, not the step (see estimate_step).
    compiler_flops, compiler_seconds = _cost(compiled)
    return {
        "attention": attention_kernel,
        "argument_bytes": memory.argument_size_in_bytes,
        "output_bytes": memory.output_size_in_bytes,
        "temp_bytes": memory.temp_size_in_bytes,
        "alias_bytes": memory.alias_size_in_bytes,
        "total_bytes": total,
        "hbm_bytes": hbm,
        "hbm_fraction": total / hbm,
        "fits": total <= hbm,
        "compiler_flops": compiler_flops,
        "compiler_optimal_seconds": compiler_seconds,
        # By kind, with each one's buffer bytes per chip (a scanned layer's counted once).
        "collectives": collectives.summary(compiled.as_text()),
    }


def kept_logits_bytes(exp, mesh) -> float:
    """Bytes per device of one microbatch's fp32 logits at every position (train.keep_logits)."""
    rules = dict(exp.mesh.rules)

    def split(name):
        axes = rules.get(name) or ()
        axes = (axes,) if isinstance(axes, str) else tuple(axes)
        return math.prod(mesh.shape[axis] for axis in axes if axis in mesh.shape)

    # Every position of the rows: the loss's chunks run over the whole sequence, gathered along
    # `length` under context parallelism.
    rows = exp.train.batch_size / exp.train.microbatches / split("batch")
    return rows * exp.train.seq_len * exp.model.vocab_size / split("vocab") * 4


def kernel_attention_flops(exp, devices: int) -> float:
    """FLOPs per device of a step's causal attention (QK^T and PV: 2 x 2 x T/2 x dim per token and
    layer forward; the backward pass twice that; remat "full" runs the forward again). XLA's cost
    analysis does not see inside a Pallas kernel, so the estimate adds these itself."""
    cfg, train = exp.model, exp.train
    passes = 4 if cfg.remat == "full" else 3
    per_token = passes * 2 * cfg.n_heads * cfg.head_dim * train.seq_len
    return per_token * cfg.n_layers * train.batch_size * train.seq_len / devices


def estimate_step(exp, whole, devices, attention: str) -> dict:
    """The step time and MFU the compiler expects, from the step compiled with one and with two
    layers, unrolled (every loop unrolled, so the cost analysis counts everything once) and for one
    microbatch: time(L) = t1 + (L - 1) (t2 - t1), times the microbatches (each runs the layers;
    the optimizer's update, counted with each, is milliseconds). The splash kernel is opaque to
    the cost analysis: its FLOPs are added at the chip's peak, so the figure is a lower bound."""
    peak = _peak_per_chip(devices[0].device_kind)
    micro = exp.train.microbatches
    costs = []
    for layers in (1, 2):
        small = exp.replace(
            model=exp.model.replace(n_layers=layers, scan_layers=False),
            train=dataclasses.replace(exp.train, batch_size=exp.train.batch_size // micro, microbatches=1),
        )
        costs.append(_cost(_lower(small, whole, devices)[1].compile()))
    (flops1, seconds1), (flops2, seconds2) = costs
    if not 0 < seconds1 <= seconds2:  # the cost model gave no usable time (e.g. a negative one)
        seconds1 = seconds2 = math.nan
    depth = exp.model.n_layers - 1
    compiler_seconds = micro * (seconds1 + depth * (seconds2 - seconds1))
    compiler_flops = micro * (flops1 + depth * (flops2 - flops1))
    kernel_flops = kernel_attention_flops(exp, len(devices)) if attention == "splash" else 0.0
    seconds = compiler_seconds + kernel_flops / peak
    # The model's FLOPs with causal attention: half of the 12 L H Q T per token that training's MFU
    # counts (at 128K, attention is most of the step and the full square would pass 100%).
    cfg = exp.model
    per_token = (
        flops_per_token(cfg, exp.train.seq_len)
        - 6.0 * cfg.n_layers * cfg.n_heads * cfg.head_dim * exp.train.seq_len
    )
    model_flops = per_token * exp.train.batch_size * exp.train.seq_len
    return {
        "model_flops_per_step": model_flops,
        "estimate_layer_seconds": micro * (seconds2 - seconds1),
        "estimate_compiler_seconds": compiler_seconds,
        "estimate_compiler_flops": compiler_flops,
        "estimate_kernel_flops": kernel_flops,
        "estimated_step_seconds": seconds,
        "estimated_mfu": model_flops / len(devices) / (seconds * peak) if seconds > 0 else math.nan,
    }


def format_rules(rules) -> str:
    """The logical-axis rules compiled with, as "batch->dcn+data+fsdp, embed->fsdp, length->-, ..."."""

    def axes(value):
        return "-" if value is None else "+".join(value) if isinstance(value, tuple) else value

    return ", ".join(f"{name}->{axes(value)}" for name, value in rules)


def _seconds(t: float) -> str:
    return f"{t:.2f} s" if t >= 1 else f"{t * 1e3:.2f} ms"


def format_report(r: dict) -> str:
    gib = lambda b: f"{b / GIB:8.2f} GiB"  # noqa: E731
    header = (
        f"{r['experiment']} on {r['slices']} x {r['topology']} ({r['devices']} devices), "
        f"mesh {r['mesh']}, remat {r['remat']}"
        + (f", {r['attention']} attention" if "attention" in r else "")
    )
    header += f"\n  rules: {r['rules']}"
    if "compiler_message" in r:
        return "\n".join(
            [
                header,
                f"  temporaries alone need {gib(r['temp_bytes'])} of {gib(r['hbm_bytes'])} "
                f"HBM per device: fits: false (the compiler: {r['compiler_message']})",
            ]
        )
    logits = (
        f"kept for the backward pass ({r['logits_bytes'] / GIB:.2f} GiB)"
        if r["keep_logits"]
        else f"recomputed in the backward pass (keeping them: {r['logits_bytes'] / GIB:.2f} GiB more, "
        f"{(r['total_bytes'] + r['logits_bytes']) / r['hbm_bytes']:.0%} of HBM)"
    )
    lines = [
        header,
        f"  per device: arguments {gib(r['argument_bytes'])}, outputs {gib(r['output_bytes'])}, "
        f"temporaries {gib(r['temp_bytes'])}, aliased {gib(r['alias_bytes'])}",
        f"  total {gib(r['total_bytes'])} of {gib(r['hbm_bytes'])} HBM ({r['hbm_fraction']:.0%}): "
        f"fits: {str(r['fits']).lower()}; compiled in {r['compile_seconds']:.1f} s",
        f"  LM head logits: {logits}",
        f"  collectives per chip (buffers; the layer loop's body once): "
        f"{collectives.format_summary(r.get('collectives', {}))}",
    ]
    if "estimated_step_seconds" in r:
        kernel = (
            f" + the attention kernel's {r['estimate_kernel_flops']:.3e} FLOPs at peak"
            if r["estimate_kernel_flops"]
            else ""
        )
        lines.append(
            f"  estimated step {_seconds(r['estimated_step_seconds'])}, MFU {r['estimated_mfu']:.1%} "
            f"({r['model_flops_per_step']:.3e} model FLOPs): the compiler's "
            f"{_seconds(r['estimate_compiler_seconds'])} for {r['estimate_compiler_flops']:.3e} FLOPs per "
            f"device (one- and two-layer unrolled compiles, {r['estimate_layer_seconds'] * 1e3:.1f} ms "
            f"per layer){kernel}"
        )
    return "\n".join(lines)


HEADROOM = 0.10  # a recipe must leave this share of HBM free on its target slice
TABLE_HEADER = (
    "| experiment | topology | mesh (data, fsdp, tensor) | microbatches | remat | attention "
    "| LM head logits | HBM per chip | estimated step (MFU) |"
)


def recipe_names() -> list[str]:
    """The pretraining experiments whose target is a TPU slice (every published recipe; `tiny`
    targets a CPU), and the LoRA and QLoRA SFT ones (text batches too). The other post-training
    stages take other batches (pairs, rollouts) and are not compiled here."""
    experiments = {name: load_experiment(name) for name in list_experiments()}

    def compiled_here(exp) -> bool:
        text = exp.posttrain is None or (exp.posttrain.stage == "sft" and exp.lora.rank > 0)
        return text and _is_topology(exp.target)

    return with_long_phases([n for n, exp in experiments.items() if compiled_here(exp)])


def with_long_phases(names: list[str]) -> list[str]:
    """Each recipe, followed by "NAME --phase N" for the first of its phases at the model's full
    context (128K), if it trains in phases."""
    out = []
    for name in names:
        out.append(name)
        exp = load_experiment(name)
        longest = [
            i + 1 for i, phase in enumerate(exp.phases) if phases.seq_len(exp, phase) == exp.model.max_seq_len
        ]
        out += [f"{name} --phase {longest[0]}"] if longest and "--phase" not in name else []
    return out


def split_recipe(entry: str) -> tuple[str, int | None]:
    """ "NAME" or "NAME --phase N" -> (NAME, N or None)."""
    name, _, phase = entry.partition(" --phase ")
    return name, int(phase) if phase else None


def _is_topology(name: str) -> bool:
    try:
        parse_topology(name)
    except ConfigError:
        return False
    return True


def table_row(exp, r: dict) -> str:
    mesh = r["mesh"]
    usage = (
        f"{r['total_bytes'] / GIB:.1f} of {r['hbm_bytes'] / GIB:.0f} GiB ({r['hbm_fraction']:.0%})"
        if r["fits"] or "total_bytes" in r
        else f"does not fit ({r['temp_bytes'] / GIB:.0f} GiB)"
    )
    step = (
        f"{r['estimated_step_seconds']:.2f} s ({r['estimated_mfu']:.0%})"
        if math.isfinite(r.get("estimated_step_seconds", math.nan))
        else "-"
    )
    context = f", context {mesh['context']}" if mesh.get("context", 1) > 1 else ""
    return (
        f"| `{r['experiment']}` | {r['topology']} | {mesh['data']}, {mesh['fsdp']}, {mesh['tensor']}{context} | "
        f"{exp.train.microbatches} | {r['remat']} | {r.get('attention', '-')} | "
        f"{'kept' if r['keep_logits'] else 'recomputed'} | {usage} | {step} |"
    )


def _same_row(readme: str, name: str, row: str) -> bool:
    """Whether README has `row` for `name`: the same configuration and HBM use within 2 points
    (compilers change), the same attention kernel. The estimate is not compared (a check
    compiles without it)."""
    match = re.search(rf"^\| `{re.escape(name)}` \|.*$", readme, re.M)
    if not match:
        return False
    ours, theirs = ([c.strip() for c in r.strip("|").split("|")] for r in (row, match.group(0)))
    percent = lambda cells: re.search(r"\((\d+)%\)", cells[7])  # noqa: E731
    if ours[:7] != theirs[:7] or not (percent(ours) and percent(theirs)):
        return ours[:8] == theirs[:8]
    return abs(int(percent(ours).group(1)) - int(percent(theirs).group(1))) <= 2


def logits_choice(entry: str, exp, r: dict) -> str | None:
    """The AOT fit chooses train.keep_logits: a recipe keeps its LM head's logits where they fit
    with HEADROOM to spare. A sentence where the recipe chose otherwise, else None."""
    if "total_bytes" not in r or "--phase" in entry:  # a phase's setting is its recipe's choice
        return None
    spare = (1 - HEADROOM) * r["hbm_bytes"]
    if not r["keep_logits"] and r["total_bytes"] + r["logits_bytes"] <= spare:
        return (
            f"{entry} recomputes its LM head in the backward pass, but keeping the logits fits "
            f"({(r['total_bytes'] + r['logits_bytes']) / r['hbm_bytes']:.0%} of HBM): set train.keep_logits=true"
        )
    return None


def recipe_table(names, check_readme: str | None = None, estimate: bool = True) -> int:
    """Compiles each recipe for its target, prints the README table; with `check_readme`, exits 1
    unless every recipe fits with HEADROOM to spare, keeps its logits where they fit, and the
    README's rows say the same."""
    from tqdm import tqdm

    rows, problems = [], []
    for entry in tqdm(names, desc="recipes", unit="recipe"):
        name, phase = split_recipe(entry)
        exp = load_experiment(name)
        report = compile_for_topology(exp, parse_topology(exp.target), phase=phase, estimate=estimate)
        rows.append(table_row(phase_of(exp, phase), report))
        tqdm.write(format_report(report))
        if not report["fits"] or report["hbm_fraction"] > 1 - HEADROOM:
            problems.append(
                f"{entry} uses {report['hbm_fraction']:.0%} of HBM on {exp.target} "
                f"(at most {1 - HEADROOM:.0%} allowed)"
            )
        problems += [p for p in [logits_choice(entry, exp, report)] if p]
    print("\n".join([TABLE_HEADER, "|" + "---|" * TABLE_HEADER.count(" | ") + "---|"] + rows))
    if check_readme:
        readme = Path(check_readme).read_text()
        problems += [
            f"the README's row for {name} should be: {row}"
            for name, row in zip(names, rows)
            if not _same_row(readme, name, row)
        ]
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    return 1 if problems else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llama_jax.aot", description=__doc__.splitlines()[0])
    parser.add_argument("--exp", default="tiny")
    parser.add_argument(
        "--topology", help="e.g. v5p-512, v5e-16, v6e-256, v5p:8x8x8 (default: the experiment's target)"
    )
    parser.add_argument("--slices", type=int, default=1, help="multi-slice: number of slices")
    parser.add_argument("--phase", type=int, help="compile this phase (from 1) of an experiment in phases")
    parser.add_argument("--json", help="also write the report to this file")
    parser.add_argument(
        "--recipes",
        nargs="*",
        metavar="NAME",
        help="compile every recipe (or those named) for its target and print the README table",
    )
    parser.add_argument(
        "--check",
        metavar="README",
        help="with --recipes: exit 1 unless each fits with "
        f"{HEADROOM:.0%}% HBM to spare and README holds the same rows",
    )
    parser.add_argument(
        "--estimate",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="estimate step time and MFU from one- and two-layer unrolled compiles (two more compiles)",
    )
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    try:
        if args.slices < 1:
            raise ConfigError(f"--slices must be at least 1, got {args.slices}.")
        if args.check and args.recipes is None:
            raise ConfigError("--check goes with --recipes: it checks the recipes' table in README.")
        if args.json and not Path(args.json).resolve().parent.is_dir():
            raise ConfigError(f"--json {args.json}: its directory does not exist.")
        if args.recipes is not None:
            if args.phase is not None:
                raise ConfigError(
                    "--phase compiles one experiment (--exp); --recipes lists their phases itself."
                )
            return recipe_table(
                with_long_phases(args.recipes) if args.recipes else recipe_names(), args.check, args.estimate
            )
        exp = apply_overrides(load_experiment(args.exp), args.overrides)
        topology = args.topology or exp.target
        if not topology or (topology == "cpu" and not args.topology):
            raise ConfigError(f"{exp.name} names no TPU slice as its target; pass --topology (e.g. v5e-4).")
        report = compile_for_topology(exp, parse_topology(topology), args.slices, args.phase, args.estimate)
    except (ConfigError, MeshError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_report(report))
    if args.json:
        try:
            with open(args.json, "w") as file:
                json.dump(report, file, indent=1)
        except OSError as err:
            print(f"error: cannot write the report to {args.json}: {err.strerror}.", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
