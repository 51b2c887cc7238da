"""Pretraining data curation on Apache Spark: deduplication, filters, language and classifiers.

    python -m llama_jax.data.curate curate.yaml

`config.py` says what a curation run is, `read.py` reads and writes documents, `text.py` holds the
per-document measures, `dedup.py`, `filters.py` and `classify.py` are the stages, and
`pipeline.py` joins them into one Spark application with its report.
"""
