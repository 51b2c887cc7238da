"""The collectives of a compiled program, by kind, read from its optimized HLO text.

The AOT report lists them so that a reader sees how the step moves data between chips: FSDP's
weight gathers should be all-gathers in the compute dtype and gradients reduce-scatters, not
all-reduces of whole buffers. Bytes are each operation's whole buffer (an all-gather's output, a
reduce-scatter's input, an all-reduce's operand), per chip. A loop body (the scanned layers) is
listed once, as it is compiled, not once per iteration.

The TPU compiler writes a reduce-scatter as a fusion of a computation named
`all-reduce-scatter*` around an all-reduce; those count as reduce-scatters.

On a multi-slice pod each slice runs its own program, and what crosses the data-center network
(DCN) between slices is a host transfer to the Megascale runtime: a `send` tagged
`_xla_megascale_transfer_type="ALL_REDUCE"` (its `recv` is the same transfer's result). Those are
listed apart, as "all-reduce over DCN", for they are far slower than the chips' own links.
"""

from __future__ import annotations

import dataclasses
import re

KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
DCN = " over DCN"  # suffix of the kinds that cross slices
_MEGASCALE = re.compile(r"^\s*(?:ROOT\s+)?%\S+\s*=\s*(.+?)\s+send\(.*_xla_megascale_transfer_type=\"(\w+)\"")
_BYTES = {
    "pred": 1,
    "s8": 1,
    "u8": 1,
    "f8e4m3fn": 1,
    "f8e5m2": 1,
    "f8e4m3": 1,
    "f8e4m3b11fnuz": 1,
    "f8e5m2fnuz": 1,
    "f8e4m3fnuz": 1,
    "s4": 1,
    "u4": 1,
    "bf16": 2,
    "f16": 2,
    "s16": 2,
    "u16": 2,
    "f32": 4,
    "s32": 4,
    "u32": 4,
    "f64": 8,
    "s64": 8,
    "u64": 8,
    "c64": 8,
    "c128": 16,
}
_ARRAY = re.compile(r"\b([a-z]+[0-9a-z]*)\[([0-9,]*)\]")
_INSTRUCTION = re.compile(
    r"^\s*(?:ROOT\s+)?%\S+\s*=\s*(.+?)\s+(all-gather|all-reduce|reduce-scatter|all-to-all|"
    r"collective-permute)(-start)?\("
)
_HEADER = re.compile(r"^%(\S+)\s*\((.*)\)\s*->\s*(.+?)\s*\{\s*$")
_REDUCE_SCATTER_FUSION = re.compile(
    r"^\s*(?:ROOT\s+)?%\S+\s*=.*\bfusion\(.*calls=%(all-reduce-scatter[^,\s]*)"
)


@dataclasses.dataclass
class Collective:
    kind: str
    dtype: str  # of the buffer (the first array of a combined one)
    bytes: int  # the whole buffer, per chip
    computation: str = ""  # the HLO computation it is in ("ENTRY" for the program's own)


def _arrays(text: str) -> list[tuple[str, int]]:
    """(dtype, bytes) of each array type written in `text`."""
    out = []
    for dtype, dims in _ARRAY.findall(text):
        if dtype not in _BYTES:
            continue
        count = 1
        for dim in filter(None, dims.split(",")):
            count *= int(dim)
        out.append((dtype, count * _BYTES[dtype]))
    return out


def _buffer(result_type: str, kind: str, started: bool) -> list[tuple[str, int]]:
    """The arrays that are the operation's buffer, from its result type."""
    arrays = _arrays(result_type)
    if started and kind in ("all-gather", "collective-permute") and len(arrays) >= 2:
        # An async start's result is (operands, outputs, ...): the outputs are the buffer.
        half = arrays[len(arrays) // 2 :] if kind == "all-gather" else arrays[1:2]
        return half
    return arrays


def parse(hlo_text: str) -> list[Collective]:
    """Every collective of the optimized HLO text `hlo_text`."""
    found: list[Collective] = []
    scatter_inputs: dict[str, list[tuple[str, int]]] = {}
    inside_scatter, computation = False, ""
    for line in hlo_text.splitlines():
        if line.startswith("ENTRY "):
            computation = "ENTRY"
        header = _HEADER.match(line)
        if header:
            computation = header.group(1)
            inside_scatter = computation.startswith("all-reduce-scatter")
            if inside_scatter:
                scatter_inputs[header.group(1)] = _arrays(header.group(2))
            continue
        if line.strip() == "}":
            inside_scatter = False
            continue
        if inside_scatter:
            continue  # the all-reduce inside the TPU's reduce-scatter fusion
        megascale = _MEGASCALE.match(line)
        if megascale:
            arrays = _arrays(megascale.group(1))
            kind = megascale.group(2).lower().replace("_", "-") + DCN
            if arrays:  # (buffer, context, token): the buffer is the first
                found.append(Collective(kind, arrays[0][0], arrays[0][1], computation))
            continue
        fusion = _REDUCE_SCATTER_FUSION.match(line)
        if fusion:
            arrays = scatter_inputs.get(fusion.group(1)) or _arrays(line.split("=", 1)[1].split("fusion(")[0])
            if arrays:
                found.append(
                    Collective("reduce-scatter", arrays[0][0], sum(b for _, b in arrays), computation)
                )
            continue
        match = _INSTRUCTION.match(line)
        if match:
            result_type, kind, started = match.group(1), match.group(2), bool(match.group(3))
            arrays = _buffer(result_type, kind, started)
            if arrays:
                found.append(Collective(kind, arrays[0][0], sum(b for _, b in arrays), computation))
    return found


def loop_bodies(hlo_text: str) -> set[str]:
    """The names of the computations that are while-loop bodies (scanned layers, microbatches)."""
    return set(re.findall(r"\bbody=%([^,\s]+)", hlo_text))


def summary(hlo_text: str) -> dict[str, dict]:
    """{kind: {"count", "bytes", "dtypes": {dtype: bytes}, "in_loops": count}} for the kinds
    present; "in_loops" counts those inside a while loop's body (run once per iteration)."""
    out: dict[str, dict] = {}
    bodies = loop_bodies(hlo_text)
    for op in parse(hlo_text):
        entry = out.setdefault(op.kind, {"count": 0, "bytes": 0, "dtypes": {}, "in_loops": 0})
        entry["count"] += 1
        entry["in_loops"] += op.computation in bodies
        entry["bytes"] += op.bytes
        entry["dtypes"][op.dtype] = entry["dtypes"].get(op.dtype, 0) + op.bytes
    order = list(KINDS) + [kind + DCN for kind in KINDS]
    return {
        kind: out[kind] for kind in sorted(out, key=lambda k: order.index(k) if k in order else len(order))
    }


def format_summary(collectives: dict[str, dict]) -> str:
    """One line: each kind's count and buffer bytes per chip, by dtype."""
    if not collectives:
        return "none"
    parts = []
    for kind, entry in collectives.items():
        dtypes = ", ".join(f"{dtype} {b / 2**20:,.1f} MiB" for dtype, b in entry["dtypes"].items())
        if kind.endswith(DCN):  # once per step unless in a loop
            dtypes += f"; {entry.get('in_loops', 0)} in loops"
        parts.append(f"{kind} x{entry['count']} ({dtypes})")
    return "; ".join(parts)
