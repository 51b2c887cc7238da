"""Curates a pretraining corpus: deduplication, filters, language and classifiers, on Apache Beam.

    python -m llama_jax.data.curate curate.yaml [--output DIR] [key=value ...] [Beam options]

The YAML file names the inputs, the stages in order and the output (see
`llama_jax/data/curation/config.py` for every stage's options). Runs on Beam's local runner;
Beam's own options choose another, e.g. `--runner=FlinkRunner --flink_master=HOST:8081` or
`--runner=DataflowRunner --project=P --region=R --temp_location=gs://B/tmp` with gs:// paths.
The curated documents are JSONL shards under OUTPUT/data (one directory per domain with a domain
stage), which `data.prepare` and `SourceConfig(kind="jsonl")` read; OUTPUT/report holds the
per-stage report and samples of what each stage removed.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

_INSTALL = "The curation stages need the curate extra: pip install -e '.[curate]'."


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m llama_jax.data.curate",
        description="Curates a corpus with a pipeline of deduplication, filter and classifier stages.",
        epilog="Other --options go to Apache Beam (for example --runner=SparkRunner "
        "--spark_master_url=spark://HOST:7077); key=value items override the config.",
    )
    p.add_argument("config", help="the YAML file naming inputs, stages and output")
    p.add_argument("--output", help="the output directory (instead of the config's)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args, rest = parser().parse_known_args(argv)
    overrides = [a for a in rest if not a.startswith("-")]
    beam_args = [a for a in rest if a.startswith("-")]
    bad = [o for o in overrides if "=" not in o]
    if bad:
        print(f"Cannot use {bad[0]!r}: overrides are key=value.", file=sys.stderr)
        return 2
    if args.output:
        overrides.append(f"output={args.output}")
    try:
        root_level = logging.getLogger().level
        logging.getLogger().setLevel(logging.ERROR)  # Beam warns about cloud clients on import
        import apache_beam  # noqa: F401
        import datasketch  # noqa: F401
        import lingua  # noqa: F401
        import sklearn  # noqa: F401

        logging.getLogger().setLevel(root_level)
    except ImportError:
        print(_INSTALL, file=sys.stderr)
        return 2
    # Beam logs a failing stage's traceback itself; the error is reported below in one sentence.
    logging.getLogger("apache_beam").setLevel(logging.CRITICAL)
    from llama_jax.data.curation import pipeline
    from llama_jax.data.curation.config import CurationError, load_config

    try:
        config = load_config(args.config, overrides)
        print(
            f"Curating {len(config.inputs)} input(s) through {len(config.stages)} stage(s) into {config.output} ..."
        )
        summary = pipeline.run(config, beam_args)
    except KeyboardInterrupt:
        print("Interrupted; nothing was written to the output.", file=sys.stderr)
        return 130
    except (CurationError, OSError, ValueError) as e:
        message = str(e).split(" [while running")[0].strip()
        print(message, file=sys.stderr)
        return 1
    print(pipeline.markdown(summary))
    if summary["read"]["unreadable"]:
        print(
            f"{summary['read']['unreadable']:,} unreadable records are listed in {config.output}/report/unreadable.jsonl."
        )
    stage = pipeline.emptied_by(summary)
    if stage is not None:
        what = "No documents could be read" if stage == "read" else f"Stage {stage} removed every document"
        print(f"{what}; see {config.output}/report/report.md.", file=sys.stderr)
        return 1
    print(f"Curated data: {config.output}/data; report: {config.output}/report/report.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
