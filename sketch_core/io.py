"""Writes that users keep are atomic: a temp file beside the target, then a rename."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable, Iterable


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(temp_path)`` and rename the result onto ``path``; a crash leaves ``path`` as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        write(partial)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda temp: temp.write_text(text))


def unused_path(path: str, exists: Callable[[str], bool] = os.path.exists) -> str:
    """``path`` if nothing is there yet, else the first free ``stem-2.suffix``, ``stem-3.suffix``, ...
    (``exists`` may check another filesystem, e.g. a results bucket)."""
    stem, dot, suffix = str(path).rpartition(".")
    if not dot or "/" in suffix:
        stem, dot, suffix = str(path), "", ""
    candidate, number = str(path), 1
    while exists(candidate):
        number += 1
        candidate = f"{stem}-{number}{dot}{suffix}"
    return candidate


def progress(iterable: Iterable, description: str, total: int | None = None):
    """A tqdm bar when a person watches a terminal; silent in logs and under Ray."""
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=description, total=total, disable=not sys.stderr.isatty(), leave=False)
