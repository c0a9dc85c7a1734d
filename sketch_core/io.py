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


def unused_path(path: str | Path) -> Path:
    """``path`` if nothing is there yet, else the first free ``stem-2.suffix``, ``stem-3.suffix``, ..."""
    path = Path(path)
    candidate, number = path, 1
    while candidate.exists():
        number += 1
        candidate = path.with_name(f"{path.stem}-{number}{path.suffix}")
    return candidate


def progress(iterable: Iterable, description: str, total: int | None = None):
    """A tqdm bar when a person watches a terminal; silent in logs and under Ray."""
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=description, total=total, disable=not sys.stderr.isatty(), leave=False)
