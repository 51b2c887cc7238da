"""Checkpoint averaging (Polyak averaging), as Llama 3 builds its final models: the element-wise
mean of the parameters of several checkpoints of one model, written as a parameters checkpoint.

    python -m llama_jax.average --out ckpt/averaged runs/anneal/checkpoints/900 runs/anneal/checkpoints/1000
    python -m llama_jax.average --out ckpt/averaged --last 3 runs/anneal    # a workdir's newest three

`averaging.average(paths)` is the same from Python. Each source is a parameters checkpoint, a workdir (its
newest checkpoint) or one of its checkpoints/STEP; they must share the architecture. The mean
is accumulated in float64, one checkpoint in host memory at a time, and written in the first
checkpoint's dtype; checksums are verified on the way in and written on the way out.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from llama_jax.averaging import AveragingError, newest_checkpoints, write_average
from llama_jax.checkpoint import CheckpointError
from llama_jax.convert.common import ConversionError


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m llama_jax.average",
        description="Average the parameters of checkpoints of one model into a parameters checkpoint.",
    )
    parser.add_argument(
        "sources", nargs="+", help="parameters checkpoints, checkpoints/STEP directories or workdirs"
    )
    parser.add_argument("--out", required=True, help="a new directory for the averaged parameters checkpoint")
    parser.add_argument("--last", type=int, help="average the N newest checkpoints of the one workdir given")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        out = Path(args.out)
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise AveragingError(
                f"The destination {out} already exists and is not empty; choose a new directory."
            )
        sources = args.sources
        if args.last is not None:
            if len(sources) != 1 or args.last < 2:
                raise AveragingError("--last N takes one workdir and N of at least 2.")
            sources = newest_checkpoints(sources[0], args.last)
        for source in sources:
            if not Path(source).exists():
                raise AveragingError(f"The checkpoint {source} does not exist.")
        write_average(sources, out, progress=False if args.no_progress else None)
    except (AveragingError, CheckpointError, ConversionError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"Averaged {len(sources)} checkpoints into {out}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
