"""What a curation run is: inputs, stages in order, output; read from a YAML file.

A stage is a one-key mapping, `{name: {option: value}}`; the options of each stage are the fields
of its dataclass below, whose defaults follow the published filters (Gopher's heuristics, which
Llama 3 cites; Llama 3's line deduplication): docs/reference.md, "Data curation". An unknown
stage or option is one sentence.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any

from llama_jax.ranges import check_ranges, non_negative, positive

INPUT_KINDS = ("text", "text_lines", "jsonl", "parquet")


class CurationError(ValueError):
    """Bad configuration or data that stops a curation run, in one sentence."""


@dataclasses.dataclass(frozen=True)
class InputConfig:
    """One corpus: files, directories or globs of `kind` (text: one document per file)."""

    path: str | tuple[str, ...]
    kind: str = "jsonl"
    field: str = "text"
    url_field: str = "url"

    @property
    def paths(self) -> tuple[str, ...]:
        return (self.path,) if isinstance(self.path, str) else tuple(self.path)


@dataclasses.dataclass(frozen=True)
class ExactDedup:
    """Keeps the first document (by id) of each group with the same key.

    key: "text" (the normalised text's hash: case, whitespace and punctuation ignored) or "url"
    (the normalised URL; documents without one pass)."""

    key: str = "text"


@dataclasses.dataclass(frozen=True)
class MinHashDedup:
    """Near duplicates by MinHash over word n-grams and LSH banding.

    Documents sharing a band are compared by their signatures; one whose estimated Jaccard
    similarity with an earlier document (by id) is at least `threshold` is removed. `bands` x `rows`
    must not exceed `num_perm`; with bands 0 they are chosen for the threshold (the split that
    minimises false positives plus nine times the false negatives, as candidates are checked)."""

    ngram: int = 5
    num_perm: int = 128
    bands: int = 0
    rows: int = 0
    threshold: float = 0.8
    seed: int = 1
    max_bucket: int = 1000  # at most this many earlier documents compared in one bucket


@dataclasses.dataclass(frozen=True)
class LineDedup:
    """Removes lines found in at least `min_documents` documents (navigation, cookie notices).

    Lines are compared with case and whitespace normalised; lines shorter than `min_chars` are
    never removed. A document left with fewer than `min_words` words is removed."""

    min_documents: int = 6
    min_chars: int = 10
    min_words: int = 1


@dataclasses.dataclass(frozen=True)
class Heuristics:
    """Per-document quality rules in the spirit of Gopher's (None switches a rule off)."""

    min_words: int | None = 50
    max_words: int | None = 100_000
    min_mean_word_length: float | None = 3.0
    max_mean_word_length: float | None = 10.0
    max_symbol_ratio: float | None = 0.1  # '#' and '...' per word
    max_non_alpha_words: float | None = 0.2  # share of words without a letter
    max_digit_ratio: float | None = 0.2  # share of characters (not Gopher's: tables of numbers)
    min_stop_words: int | None = 2  # of the, be, to, of, and, that, have, with
    max_bullet_lines: float | None = 0.9
    max_ellipsis_lines: float | None = 0.3
    max_duplicate_lines: float | None = 0.3  # share of lines repeating an earlier line
    max_duplicate_line_chars: float | None = 0.2
    max_top_ngram_chars: Mapping[int, float] | None = dataclasses.field(
        default_factory=lambda: {2: 0.20, 3: 0.18, 4: 0.16}
    )
    max_duplicate_ngram_chars: Mapping[int, float] | None = dataclasses.field(
        default_factory=lambda: {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10}
    )
    blocklist: tuple[str, ...] = ()  # words or phrases, matched on word boundaries, any case
    blocklist_file: str = ""  # one word or phrase per line
    max_blocklist_hits: int = 0


@dataclasses.dataclass(frozen=True)
class Language:
    """Language identification with Lingua (its models ship in the package; nothing downloads).

    keep: ISO 639-1 codes kept; languages: the codes the detector chooses among (empty: all 75);
    a document is kept when its most likely language is in `keep` with at least
    `min_confidence`. Only the first `max_chars` characters are read."""

    keep: tuple[str, ...] = ("en",)
    languages: tuple[str, ...] = ()
    min_confidence: float = 0.5
    max_chars: int = 2000
    low_accuracy: bool = False


@dataclasses.dataclass(frozen=True)
class Labels:
    """Where a classifier's training labels come from (exactly one of the two).

    file: JSONL lines {"id": ..., "label": ...} (written, for example, by
      `python -m llama_jax.judge`, a llama_jax model judging a sample, as Llama 3 used Llama 2);
    function: "module:function" called with a list of texts, returning one label or score each.
    Scores (numbers) become labels with `score_threshold`: "high" at or above it, else "low"."""

    file: str = ""
    function: str = ""
    score_threshold: float = 0.5


@dataclasses.dataclass(frozen=True)
class Quality:
    """A fast text classifier (hashed word n-grams, logistic regression) trained on labelled
    documents of the stage's input; documents whose probability of `good` is below `threshold`
    are removed. `model` loads a classifier saved by an earlier run instead of training one."""

    labels: Labels = dataclasses.field(default_factory=Labels)
    good: str = "high"
    threshold: float = 0.5
    sample: int = 2000  # at most this many labelled documents train it
    model: str = ""


@dataclasses.dataclass(frozen=True)
class Domain:
    """The same classifier over `classes`; each document gets a `domain`, and the curated data is
    written one directory per domain, with their token counts, to feed an experiment's mixture
    (`llama_jax.data.curation.pipeline.mixture_sources`)."""

    classes: tuple[str, ...] = ()
    labels: Labels = dataclasses.field(default_factory=Labels)
    sample: int = 2000
    model: str = ""


STAGES: dict[str, type] = {
    "exact_dedup": ExactDedup,
    "minhash_dedup": MinHashDedup,
    "line_dedup": LineDedup,
    "heuristics": Heuristics,
    "language": Language,
    "quality": Quality,
    "domain": Domain,
}


@dataclasses.dataclass(frozen=True)
class CurateConfig:
    inputs: tuple[InputConfig, ...]
    stages: tuple[tuple[str, Any], ...]  # (name, options)
    output: str = ""
    shards: int = 4
    tokenizer: str = ""  # a tokenizer.model for the token counts; empty counts words
    samples: int = 20  # removed documents kept per stage for auditing

    @property
    def stage_ids(self) -> list[str]:
        """Unique names for the report: `heuristics`, or `exact_dedup.2` for a repeated stage."""
        seen: dict[str, int] = {}
        ids = []
        for name, _ in self.stages:
            seen[name] = seen.get(name, 0) + 1
            ids.append(name if seen[name] == 1 else f"{name}.{seen[name]}")
        return ids


def _build(cls: type, options: Any, where: str):
    """A dataclass from a mapping, with one sentence for unknown options and wrong types."""
    if options is None:
        options = {}
    if not isinstance(options, Mapping):
        raise CurationError(f"{where} must be a mapping of options, got {options!r}.")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - set(fields))
    if unknown:
        raise CurationError(
            f"{where} has no option {unknown[0]!r}; its options are {', '.join(sorted(fields))}."
        )
    values = {}
    for name, value in options.items():
        kind = str(fields[name].type)
        if name == "labels":
            value = _build(Labels, value, f"{where}.labels")
        elif kind.startswith("tuple") or kind.startswith("str | tuple"):
            if isinstance(value, str) and not kind.startswith("str"):
                value = (value,)
            elif isinstance(value, Sequence) and not isinstance(value, str):
                value = tuple(str(v) for v in value)
        elif kind.startswith("Mapping"):
            if value is not None:
                if not isinstance(value, Mapping):
                    raise CurationError(f"{where}.{name} must be a mapping of n to a share, got {value!r}.")
                value = {int(k): float(v) for k, v in value.items()}
        elif kind.startswith("str") and not isinstance(value, str):
            raise CurationError(f"{where}.{name} must be a string, got {value!r}.")
        elif kind.startswith("bool") and not isinstance(value, bool):
            raise CurationError(f"{where}.{name} must be true or false, got {value!r}.")
        values[name] = value
    config = cls(**values)
    numeric = [
        (f.name, positive if f.name not in _NON_NEGATIVE else non_negative, "a positive number")
        for f in dataclasses.fields(cls)
        if str(f.type).split(" ")[0] in ("int", "float")
    ]
    for name, pred, what in numeric:
        if name in _NON_NEGATIVE:
            what = "at least 0"
        try:
            check_ranges(where, config, [(name, pred, what)])
        except ValueError as e:
            raise CurationError(str(e)) from None
    return config


_NON_NEGATIVE = {
    "max_blocklist_hits",
    "min_confidence",
    "threshold",
    "score_threshold",
    "seed",
    "bands",
    "rows",
    "min_words",
    "max_symbol_ratio",
    "max_non_alpha_words",
    "max_digit_ratio",
    "min_stop_words",
    "max_bullet_lines",
    "max_ellipsis_lines",
    "max_duplicate_lines",
    "max_duplicate_line_chars",
}


def _check_stage(name: str, stage, where: str) -> None:
    if name == "exact_dedup" and stage.key not in ("text", "url"):
        raise CurationError(f"{where}.key must be text or url, got {stage.key!r}.")
    if name == "minhash_dedup":
        if not 0 < stage.threshold <= 1:
            raise CurationError(f"{where}.threshold must be in (0, 1], got {stage.threshold!r}.")
        if bool(stage.bands) != bool(stage.rows):
            raise CurationError(f"{where}: give both bands and rows, or neither (chosen for the threshold).")
        if stage.bands * stage.rows > stage.num_perm:
            raise CurationError(
                f"{where}: bands x rows ({stage.bands} x {stage.rows}) exceeds num_perm ({stage.num_perm})."
            )
    if name == "language":
        if not stage.keep:
            raise CurationError(f"{where}.keep must name at least one language.")
        for code in stage.keep + stage.languages:
            lingua_language(code, where)
        if stage.languages and not set(stage.keep) <= set(stage.languages):
            raise CurationError(f"{where}: every language in keep must be among languages.")
    if name in ("quality", "domain"):
        if not stage.model and bool(stage.labels.file) == bool(stage.labels.function):
            raise CurationError(
                f"{where} needs labels.file or labels.function (exactly one), or a trained model."
            )
        if stage.labels.function and ":" not in stage.labels.function:
            raise CurationError(
                f"{where}.labels.function must be module:function, got {stage.labels.function!r}."
            )
    if name == "quality" and not 0 <= stage.threshold <= 1:
        raise CurationError(f"{where}.threshold must be a probability in [0, 1], got {stage.threshold!r}.")
    if name == "domain" and len(stage.classes) < 2:
        raise CurationError(f"{where}.classes must name at least two domains.")


def lingua_language(code: str, where: str = "language"):
    """Lingua's Language for an ISO 639-1 code; one sentence for a code it does not know."""
    from lingua import IsoCode639_1
    from lingua import Language as LinguaLanguage

    try:
        return LinguaLanguage.from_iso_code_639_1(IsoCode639_1.from_str(code.lower()))
    except (ValueError, KeyError, AttributeError):
        raise CurationError(
            f"{where}: {code!r} is not an ISO 639-1 code of a language Lingua knows."
        ) from None


def parse_config(raw: Mapping[str, Any]) -> CurateConfig:
    """A CurateConfig from plain data (a parsed YAML file); one sentence for what is wrong."""
    if not isinstance(raw, Mapping):
        raise CurationError("A curation config must be a mapping with inputs, stages and output.")
    known = {f.name for f in dataclasses.fields(CurateConfig)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise CurationError(f"Unknown setting {unknown[0]!r}; the settings are {', '.join(sorted(known))}.")
    inputs = raw.get("inputs")
    if isinstance(inputs, (str, Mapping)):
        inputs = [inputs]
    if not inputs:
        raise CurationError("The config names no inputs.")
    if not isinstance(inputs, Sequence):
        raise CurationError(f"inputs must be a list of paths or sources, got {inputs!r}.")
    stage_list = raw.get("stages") or []
    if isinstance(stage_list, str) or not isinstance(stage_list, Sequence):
        raise CurationError(f"stages must be a list of stages, got {stage_list!r}.")
    parsed_inputs = []
    for i, item in enumerate(inputs):
        if isinstance(item, str):
            item = {"path": item}
        if not isinstance(item, Mapping) or "path" not in item:
            raise CurationError(f"inputs[{i}] must be a path or a mapping with a path.")
        source = _build(InputConfig, item, f"inputs[{i}]")
        if source.kind not in INPUT_KINDS:
            raise CurationError(
                f"inputs[{i}].kind must be one of {', '.join(INPUT_KINDS)}, got {source.kind!r}."
            )
        parsed_inputs.append(source)
    stages = []
    for i, item in enumerate(stage_list):
        if isinstance(item, str):
            item = {item: {}}
        if not isinstance(item, Mapping) or len(item) != 1:
            raise CurationError(f"stages[{i}] must be a stage name or {{name: {{options}}}}, got {item!r}.")
        ((name, options),) = item.items()
        if name not in STAGES:
            raise CurationError(f"Unknown stage {name!r}; the stages are {', '.join(STAGES)}.")
        where = f"stages[{i}].{name}"
        stage = _build(STAGES[name], options, where)
        _check_stage(name, stage, where)
        stages.append((name, stage))
    if [n for n, _ in stages].count("domain") > 1:
        raise CurationError("Only one domain stage can split the output.")
    config = CurateConfig(
        inputs=tuple(parsed_inputs),
        stages=tuple(stages),
        output=str(raw.get("output") or ""),
        shards=raw.get("shards", 4),
        tokenizer=str(raw.get("tokenizer") or ""),
        samples=raw.get("samples", 20),
    )
    try:
        check_ranges(
            "", config, [("shards", positive, "at least 1"), ("samples", non_negative, "at least 0")]
        )
    except ValueError as e:
        raise CurationError(str(e)) from None
    return config


def load_config(path: str, overrides: Sequence[str] = ()) -> CurateConfig:
    """Reads a YAML config; `overrides` are OmegaConf dotlist items such as output=curated/."""
    import yaml
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    if not os.path.isfile(path):
        raise CurationError(f"No such config file: {path}.")
    try:
        conf = OmegaConf.load(path)
        if not OmegaConf.is_dict(conf):
            raise CurationError(f"{path} must be a mapping with inputs, stages and output.")
        if overrides:
            conf = OmegaConf.merge(conf, OmegaConf.from_dotlist(list(overrides)))
        raw = OmegaConf.to_container(conf, resolve=True)
    except CurationError:
        raise
    except UnicodeDecodeError:  # a ValueError: before the clause below
        raise CurationError(f"Cannot read {path}: it is not UTF-8 text.") from None
    except (OmegaConfBaseException, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CurationError(f"Cannot read {path}: {first}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or type(e).__name__
        raise CurationError(f"{path} is not valid YAML: {problem}{where}.") from None
    return parse_config(raw)
