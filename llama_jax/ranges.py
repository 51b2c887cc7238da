"""Ranges of numeric settings: a value outside its range is one sentence naming the setting.

Shared by the experiment configuration and the data configuration (which sit side by side at the
bottom of the layers), so that every numeric setting is checked the same way.
"""

from __future__ import annotations

import dataclasses
import math


def check_ranges(section: str, cfg, checks) -> None:
    """Raises ValueError naming `section.field` for the first value outside its range.

    `checks`: (field name, predicate, what the range is in words). A field declared `int` must
    hold an integer; None passes where the field is declared `... | None`."""
    declared = {field.name: str(field.type) for field in dataclasses.fields(cfg)}
    prefix = f"{section}." if section else ""
    for name, in_range, what in checks:
        value = getattr(cfg, name)
        kind = declared.get(name, "")
        if value is None and "None" in kind:
            continue
        wrong_type = isinstance(value, bool) or not isinstance(value, (int, float))
        if not wrong_type and kind.startswith("int") and not isinstance(value, int):
            wrong_type = True
        if wrong_type:
            noun = "an integer" if kind.startswith("int") else "a number"
            raise ValueError(f"{prefix}{name} must be {noun}, {what}; got {value!r}.")
        if not math.isfinite(value) or not in_range(value):
            raise ValueError(f"{prefix}{name} must be {what}, got {value!r}.")


def positive(x) -> bool:
    return x > 0


def non_negative(x) -> bool:
    return x >= 0


def fraction(x) -> bool:
    return 0 <= x <= 1


def below_one(x) -> bool:
    return 0 <= x < 1
