"""The device mesh and the one table that maps logical axis names to it.

Model code names axes (`embed`, `heads`, ...); the experiment's `mesh.rules` (default
`config.DEFAULT_RULES`) say which mesh axes shard each. Changing an experiment's parallelism changes
its mesh sizes or its rules, never the model.
"""

from __future__ import annotations

import contextlib
import math
import os

import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from llama_jax.config import DEFAULT_RULES, MeshConfig

MESH_AXES = ("dcn", "data", "fsdp", "context", "tensor")


class MeshError(ValueError):
    """A mesh that does not fit the devices or the batch; the message is one sentence."""


def slice_count(devices) -> int:
    """How many slices of a multi-slice TPU pod the devices span (1 elsewhere)."""
    return len({getattr(device, "slice_index", 0) for device in devices})


def mesh_shape(cfg: MeshConfig, n_devices: int, slices: int = 1) -> dict[str, int]:
    """Each mesh axis's size: `dcn` across slices (0: `slices`), the others inside one."""
    dcn = cfg.dcn or slices
    if dcn < 0:
        raise MeshError(f"mesh.dcn must be 0 (one per slice) or positive, got {cfg.dcn}.")
    if n_devices % dcn:
        raise MeshError(f"mesh.dcn={dcn} does not divide the {n_devices} devices.")
    if slices > 1 and dcn != slices:
        raise MeshError(f"The devices span {slices} slices, so mesh.dcn must be {slices} (or 0), not {dcn}.")
    per_group = n_devices // dcn
    sizes = {name: getattr(cfg, name) for name in MESH_AXES[1:]}
    free = [name for name, size in sizes.items() if size == -1]
    if len(free) > 1:
        raise MeshError(f"Only one mesh axis may be -1, got {', '.join(free)}.")
    if any(size == 0 or size < -1 for size in sizes.values()):
        raise MeshError(f"Mesh sizes must be positive or -1, got {sizes}.")
    fixed = math.prod(size for size in sizes.values() if size != -1)
    where = f"the {per_group} devices of each of {dcn} slices" if dcn > 1 else f"the {per_group} devices"
    if free:
        if per_group % fixed:
            fixed_axes = ", ".join(f"{k}={v}" for k, v in sizes.items() if v != -1)
            raise MeshError(f"The mesh sizes {fixed_axes} do not divide {where}.")
        sizes[free[0]] = per_group // fixed
    if math.prod(sizes.values()) != per_group:
        raise MeshError(
            f"The mesh {_describe(sizes)} needs {math.prod(sizes.values())} devices, but there "
            f"are {per_group}" + (f" in each of {dcn} slices." if dcn > 1 else ".")
        )
    return {"dcn": dcn, **sizes}


def _describe(sizes: dict[str, int]) -> str:
    return " ".join(
        f"{name}={size}" for name, size in sizes.items() if name not in ("context", "dcn") or size != 1
    )


def make_mesh(cfg: MeshConfig, devices=None) -> Mesh:
    devices = jax.devices() if devices is None else devices
    slices = slice_count(devices)
    sizes = mesh_shape(cfg, len(devices), slices)
    shape = tuple(sizes[name] for name in MESH_AXES)
    # Auto axes: XLA propagates shardings from the parameters, batches and the model's constraints.
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    try:
        # Slices, or on GPUs the hosts: the groups of devices the dcn axis steps across.
        granules = slices if slices > 1 else len({d.process_index for d in devices})
        if sizes["dcn"] > 1 and granules > 1:
            if granules != sizes["dcn"]:
                raise MeshError(f"mesh.dcn={sizes['dcn']} must be the number of hosts, {granules}.")
            # A hybrid mesh: the dcn axis steps across slices (or hosts), the others stay on each
            # slice's torus. (One host simulating devices takes the plain mesh below.)
            from jax.experimental import mesh_utils

            grid = mesh_utils.create_hybrid_device_mesh(
                (1, *shape[1:]),
                (sizes["dcn"], *(1,) * (len(shape) - 1)),
                devices,
                process_is_granule=slices == 1,
            )
            return Mesh(grid, MESH_AXES, axis_types=auto)
        return jax.make_mesh(shape, MESH_AXES, auto, devices=devices)
    except NotImplementedError:  # JAX found no layout of these axis sizes on the chips' torus
        physical = getattr(devices[0], "coords", None) and "x".join(
            str(max(d.coords[i] for d in devices) + 1) for i in range(len(devices[0].coords))
        )
        raise MeshError(
            f"The mesh {_describe(sizes)} does not map onto "
            f"the chips' {physical or 'physical'} torus: each size must be a product of "
            "whole torus dimensions."
        ) from None


def logical_to_spec(logical: PartitionSpec, shape, mesh: Mesh, rules=None) -> PartitionSpec:
    """The mesh PartitionSpec of an array; dims the mesh axes do not divide stay replicated.
    `rules`: by default those of the enclosing `activation_sharding` (else DEFAULT_RULES)."""
    rules = rules if rules is not None else (nn.get_logical_axis_rules() or DEFAULT_RULES)
    spec = nn.logical_to_mesh_axes(tuple(logical), rules)
    fitted = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        # Axes of one device split nothing: left out, so that e.g. (fsdp, context) with
        # context=1 reads as plain fsdp.
        names = tuple(n for n in ((axes,) if isinstance(axes, str) else (axes or ())) if mesh.shape[n] > 1)
        size = math.prod(mesh.shape[name] for name in names)
        fitted.append((names[0] if len(names) == 1 else names) if size > 1 and dim % size == 0 else None)
    return PartitionSpec(*fitted)


def tree_shardings(abstract_tree, logical_specs, mesh: Mesh, rules=DEFAULT_RULES):
    """NamedShardings for a tree of shapes, given the matching tree of logical PartitionSpecs."""
    is_spec = lambda x: isinstance(x, PartitionSpec) or x is None  # noqa: E731
    specs = jax.tree.leaves(logical_specs, is_leaf=is_spec)
    leaves, treedef = jax.tree.flatten(abstract_tree)
    if len(specs) != len(leaves):
        raise ValueError(f"{len(leaves)} arrays but {len(specs)} partition specs.")
    return treedef.unflatten(
        [
            NamedSharding(mesh, logical_to_spec(spec or PartitionSpec(), leaf.shape, mesh, rules))
            for leaf, spec in zip(leaves, specs)
        ]
    )


def batch_sharding(mesh: Mesh, rules=DEFAULT_RULES, ndim: int = 2) -> NamedSharding:
    """Batches [batch, ...] split along their first axis as the rules shard `batch` (by default
    over the data-parallel axes, data and fsdp)."""
    batch_axes = nn.logical_to_mesh_axes(("batch",), rules)[0]
    return NamedSharding(mesh, PartitionSpec(batch_axes, *[None] * (ndim - 1)))


def data_parallel_size(mesh: Mesh) -> int:
    return mesh.shape["dcn"] * mesh.shape["data"] * mesh.shape["fsdp"]


def check_batch(batch_size: int, microbatches: int, mesh: Mesh) -> None:
    dp = data_parallel_size(mesh)
    if batch_size % microbatches:
        raise MeshError(
            f"train.batch_size={batch_size} is not divisible by train.microbatches={microbatches}."
        )
    if (batch_size // microbatches) % dp:
        raise MeshError(
            f"The microbatch of {batch_size // microbatches} sequences is not divisible "
            f"by the data-parallel size {dp} (mesh.dcn x mesh.data x mesh.fsdp)."
        )


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules=DEFAULT_RULES):
    """Inside, the model's `with_logical_constraint`s resolve against this mesh and table."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield


def device_memory_bytes(devices=None) -> int | None:
    """Memory of one device: an accelerator's own limit, or on a CPU host the memory available
    now shared by its (simulated) devices; None where it cannot be told."""
    devices = jax.local_devices() if devices is None else devices
    if devices[0].platform != "cpu":
        stats = devices[0].memory_stats() or {}
        return stats.get("bytes_limit")
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None
    return available // len(devices)
