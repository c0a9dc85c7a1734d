"""Typed settings from untyped values (YAML, JSON, the command line), for every dataclass of
settings: ``TrainConfig`` and the sections of a search-space file.

A field declares its range with ``spec(...)`` metadata; ``from_mapping`` rejects unknown keys,
coerces each value to the field's type and checks its range, with one error line that names the
source and the field.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping
from typing import Any

from sketch_core.errors import SketchError

TRUE_WORDS, FALSE_WORDS = ("true", "yes"), ("false", "no")


def spec(*, choices=None, low=None, high=None, low_open=False, help="") -> dict[str, Any]:
    """A field's metadata: its ``choices``, or its bounds (``low`` exclusive when ``low_open``),
    and a help text for command-line options."""
    return {"choices": choices, "low": low, "high": high, "low_open": low_open, "help": help}


def from_mapping(kind: type, values: Mapping[str, Any], *, source: str, prefix: str = ""):
    """``kind(**values)`` with every value coerced to its field's type and checked against its
    ``spec``; ``prefix`` names the section in errors (``search.``)."""
    check_keys(kind, values, source=source, prefix=prefix)
    fields = {f.name: f for f in dataclasses.fields(kind)}
    typed = {
        key: coerce(fields[key], value, f"{source}: {prefix}{key}") for key, value in values.items()
    }
    settings = kind(**typed)
    for f in dataclasses.fields(kind):
        check_range(f, getattr(settings, f.name), f"{source}: {prefix}{f.name}")
    return settings


def check_keys(kind: type, keys, *, source: str, prefix: str = "") -> None:
    known = [f.name for f in dataclasses.fields(kind)]
    for key in keys:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise SketchError(f"{source}: {prefix}{key}: unknown key{hint}")


def coerce(f: dataclasses.Field, value: Any, where: str) -> Any:
    """``value`` as the field's type (bool, int, float or str). YAML reads ``1e-3`` as text and JSON
    writes whole floats as ints; a bool is never taken for a number, nor a number for a bool."""
    kind = f.type if isinstance(f.type, str) else f.type.__name__
    bad = SketchError(f"{where}: expected {kind}, got {value!r}")
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in TRUE_WORDS + FALSE_WORDS:
            return value.lower() in TRUE_WORDS
        raise bad
    if isinstance(value, bool) and kind in ("int", "float"):
        raise bad
    if kind == "int":
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if not isinstance(value, str):
            raise bad
        try:
            return int(value)
        except ValueError:
            raise bad from None
    if kind == "float":
        try:
            return float(value)
        except (TypeError, ValueError):
            raise bad from None
    if kind == "str":
        if isinstance(value, (dict, list)) or value is None:
            raise bad
        return str(value)
    raise bad


def check_range(f: dataclasses.Field, value: Any, where: str) -> None:
    limits = f.metadata
    if not limits:
        return
    if limits["choices"] is not None and value not in limits["choices"]:
        raise SketchError(
            f"{where}: expected one of {', '.join(map(str, limits['choices']))}, got {value!r}"
        )
    low, high = limits["low"], limits["high"]
    if low is not None and (value <= low if limits["low_open"] else value < low):
        relation = ">" if limits["low_open"] else ">="
        raise SketchError(f"{where}: expected a value {relation} {low}, got {value!r}")
    if high is not None and value > high:
        raise SketchError(f"{where}: expected a value <= {high}, got {value!r}")
