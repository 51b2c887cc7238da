"""Joining the processes of a multi-host job (TPU pod slices, GPU clusters) before JAX starts.

Every process runs the same program; `jax.distributed.initialize` connects them so that
`jax.devices()` lists the devices of all hosts and one jitted step spans them. On Cloud TPU VMs
and SLURM JAX finds the coordinator itself; elsewhere (a GPU cluster, or several processes on one
machine) pass the coordinator's address, the number of processes and this process's id, as flags
or as JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import itertools
import os
import socket
import sys
import time

import jax


class DistributedError(Exception):
    """The processes of a multi-host job could not be joined."""


DEFAULT_INIT_TIMEOUT = 300.0


@dataclasses.dataclass(frozen=True)
class ProcessSpec:
    coordinator: str | None = None  # host:port of process 0
    num_processes: int | None = None
    process_id: int | None = None
    init_timeout: float = DEFAULT_INIT_TIMEOUT  # seconds to wait for the coordinator and the others

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ProcessSpec:
        env = os.environ

        def number(value, name):
            if value in (None, ""):
                return None
            try:
                return int(value)
            except ValueError:
                raise DistributedError(f"{name} must be an integer, got {value!r}.") from None

        timeout = getattr(args, "init_timeout", None)
        if timeout is not None and timeout <= 0:
            raise DistributedError(f"--init-timeout must be positive, got {timeout}.")
        return cls(
            args.coordinator or env.get("JAX_COORDINATOR_ADDRESS") or None,
            number(
                args.num_processes if args.num_processes is not None else env.get("JAX_NUM_PROCESSES"),
                "the number of processes",
            ),
            number(
                args.process_id if args.process_id is not None else env.get("JAX_PROCESS_ID"),
                "the process id",
            ),
            DEFAULT_INIT_TIMEOUT if timeout is None else float(timeout),
        )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "multi-host", "Not needed on Cloud TPU VMs or under SLURM, where JAX finds its peers."
    )
    group.add_argument(
        "--coordinator", metavar="HOST:PORT", help="address of process 0 (or $JAX_COORDINATOR_ADDRESS)"
    )
    group.add_argument("--num-processes", type=int, help="processes in the job (or $JAX_NUM_PROCESSES)")
    group.add_argument("--process-id", type=int, help="this process, 0..N-1 (or $JAX_PROCESS_ID)")
    group.add_argument(
        "--init-timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help=f"how long to wait for the coordinator and the other processes (default {DEFAULT_INIT_TIMEOUT:g})",
    )


def _in_a_cluster_jax_detects() -> bool:
    # A TPU VM has accelerator device files (/dev/accel* up to v5e, /dev/vfio/* from v5p on); SLURM
    # and Open MPI say how many tasks there are. A single-host TPU VM joins a job of one, harmlessly.
    if glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*"):
        return True
    return any(int(os.environ.get(var, "1") or 1) > 1 for var in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"))


def initialize(spec: ProcessSpec) -> None:
    """Joins the job if there is one; a lone process on a laptop or a GPU box does nothing."""
    explicit = [spec.coordinator, spec.num_processes, spec.process_id]
    if any(value is not None for value in explicit):
        if any(value is None for value in explicit):
            raise DistributedError(
                "A multi-host job needs all of --coordinator, --num-processes and "
                "--process-id (or their JAX_* variables)."
            )
        if not 0 <= spec.process_id < spec.num_processes:
            raise DistributedError(f"--process-id {spec.process_id} is not in 0..{spec.num_processes - 1}.")
        if spec.num_processes == 1:
            return
    elif not _in_a_cluster_jax_detects():
        return
    if spec.coordinator and spec.process_id:
        _wait_for_coordinator(spec.coordinator, spec.init_timeout)
    try:
        jax.distributed.initialize(
            spec.coordinator,
            spec.num_processes,
            spec.process_id,
            initialization_timeout=int(spec.init_timeout),
        )
    except Exception as err:  # noqa: BLE001 - JAX raises RuntimeError/ValueError/XlaRuntimeError here
        first = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
        where = f" at {spec.coordinator}" if spec.coordinator else ""
        raise DistributedError(f"Could not join the other processes{where} ({first}).") from None


def _wait_for_coordinator(address: str, timeout: float) -> None:
    """Returns once process 0 accepts connections at `address`; after `timeout` seconds, one
    sentence (JAX itself would wait as long, then abort the process without one)."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise DistributedError(f"--coordinator {address!r} is not of the form host:port.")
    print(f"waiting up to {timeout:g} s for the coordinator at {address}", file=sys.stderr, flush=True)
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=min(5.0, timeout)):
                return
        except OSError as err:
            if time.monotonic() >= deadline:
                raise DistributedError(
                    f"The coordinator at {address} did not answer within {timeout:g} s ({err.strerror or err}); "
                    "start process 0 first, check the address, or raise --init-timeout."
                ) from None
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))


# How long a process waits for the others at a barrier (the same as Orbax's own default for the
# waits of an asynchronous save) before it ends with one sentence instead of hanging.
BARRIER_TIMEOUT_S = 1200.0
_barriers = itertools.count()


def barrier(name: str, timeout_s: float = BARRIER_TIMEOUT_S) -> None:
    """Returns once every process has reached this barrier; after `timeout_s` seconds, one
    sentence. A lone process returns at once."""
    if jax.process_count() == 1:
        return
    import orbax.checkpoint as ocp

    key = f"llama_jax-{name}-{next(_barriers)}"  # a barrier name is used once
    try:
        ocp.multihost.get_jax_distributed_client().wait_at_barrier(key, int(timeout_s * 1000))
    except Exception as err:  # noqa: BLE001 - the runtime raises XlaRuntimeError (DEADLINE_EXCEEDED)
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise DistributedError(
            f"Process {jax.process_index()} waited {timeout_s:g} s for the other processes at {name!r} "
            f"and not all of them came; one has stopped or is stuck ({first})."
        ) from None
