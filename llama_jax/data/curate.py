"""Curates a pretraining corpus: deduplication, filters, language and classifiers, on Apache Spark.

    python -m llama_jax.data.curate curate.yaml [--output DIR] [--master URL] [key=value ...]

The YAML file names the inputs, the stages in order and the output (see
`llama_jax/data/curation/config.py` for every stage's options). Runs on a local Spark using every
core (`--master local[*]`, the default); `--master spark://HOST:7077` (or `yarn`, or `k8s://...`)
runs the same pipeline on a cluster, whose workers need llama_jax installed and the paths
reachable (a shared file system, or gs://, s3://, hdfs:// URLs). The curated documents are JSONL
shards under OUTPUT/data (one directory per domain with a domain stage), which `data.prepare` and
`SourceConfig(kind="jsonl")` read; OUTPUT/report holds the per-stage report and samples of what
each stage removed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from collections.abc import Sequence

_INSTALL = "The curation stages need the curate extra: pip install -e '.[curate]'."


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m llama_jax.data.curate",
        description="Curates a corpus with a pipeline of deduplication, filter and classifier stages.",
        epilog="key=value items override the config, e.g. output=curated/ or stages.0.exact_dedup.key=url.",
    )
    p.add_argument("config", help="the YAML file naming inputs, stages and output")
    p.add_argument("overrides", nargs="*", help="key=value changes to the config")
    p.add_argument("--output", help="the output directory (instead of the config's)")
    p.add_argument(
        "--master", default="local[*]", help="the Spark master (default: local[*], every core here)"
    )
    p.add_argument("--spark-conf", action="append", default=[], metavar="KEY=VALUE", help="a Spark setting")
    return p


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    for line in text.splitlines():
        if line.strip().startswith(("CurationError:", "llama_jax.data.curation.config.CurationError:")):
            return line.split(":", 1)[1].strip()
    return text.splitlines()[0] if text else type(error).__name__


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    overrides = list(args.overrides)
    bad = [o for o in overrides + args.spark_conf if "=" not in o]
    if bad:
        print(f"Cannot use {bad[0]!r}: overrides and Spark settings are key=value.", file=sys.stderr)
        return 2
    if args.output:
        overrides.append(f"output={args.output}")
    try:
        import datasketch  # noqa: F401
        import lingua  # noqa: F401
        import pyspark  # noqa: F401
        import sklearn  # noqa: F401
    except ImportError:
        print(_INSTALL, file=sys.stderr)
        return 2
    from llama_jax.data.curation import pipeline
    from llama_jax.data.curation.config import CurationError, load_config

    try:
        config = load_config(args.config, overrides)
        print(
            f"Curating {len(config.inputs)} input(s) through {len(config.stages)} stage(s) into {config.output}"
        )
        java = (
            os.path.join(os.environ["JAVA_HOME"], "bin", "java")
            if os.environ.get("JAVA_HOME")
            else shutil.which("java")
        )
        if not java or not os.access(java, os.X_OK):
            raise CurationError(
                "Spark needs Java 17 or later, and none was found: set JAVA_HOME or put java on PATH."
            )
        try:
            session = pipeline.spark_session(args.master, args.spark_conf, progress=sys.stderr.isatty())
        except Exception as e:  # noqa: BLE001 - Spark reports a missing Java or a bad master many ways
            raise CurationError(
                f"Spark did not start on {args.master} ({_first_line(e)}); it needs Java 17 or later (JAVA_HOME)."
            ) from None
        summary = pipeline.run(config, session)
    except KeyboardInterrupt:
        print("Interrupted; the output was not written.", file=sys.stderr)
        return 130
    except (CurationError, OSError, ValueError) as e:
        print(_first_line(e), file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 - a failed Spark job arrives as a Java exception
        print(f"The Spark job failed: {_first_line(e)}", file=sys.stderr)
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
