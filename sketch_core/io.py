"""Files: atomic writes, files built once per node under a lock, fingerprints, unused names,
progress bars.

Writes that users keep and caches that other processes read are atomic: a temporary file beside
the target, then a rename, so a reader sees the old file or the whole new one, never a part.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

from filelock import FileLock


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(temp_path)`` and rename the result onto ``path``; a crash leaves ``path`` as
    it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        write(partial)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path


def save_npy(path: str | Path, array) -> None:
    """``array`` as a .npy file at exactly ``path`` (np.save would add .npy to a name without it);
    pass it to ``atomic_write`` or ``build_once``."""
    import numpy as np

    with open(path, "wb") as handle:
        np.save(handle, array)


def build_once(path: str | Path, build: Callable[[Path], None]) -> Path:
    """``path``, built by ``build(temp_path)`` if it is not there yet. Several processes of a node
    may ask at once: one builds it under a file lock, the others wait for the lock and then find
    the file whole (``atomic_write``)."""
    path = Path(path)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(path.with_name(f"{path.name}.lock")):
            if not path.exists():  # another process built it while we waited
                atomic_write(path, build)
    return path


def file_fingerprint(path: str | Path) -> str:
    """What identifies a file's content cheaply: its absolute path, size and modification time
    (empty for no path). Cache keys change whenever a file they depend on does."""
    if not path:
        return ""
    stat = os.stat(path)
    return f"{os.path.abspath(path)}\0{stat.st_size}\0{stat.st_mtime_ns}"


def unused_path(path: str, exists: Callable[[str], bool] = os.path.exists) -> str:
    """``path`` if nothing is there yet, else the first free ``stem-2.suffix``, ``stem-3.suffix``,
    ... (``exists`` may check another filesystem, e.g. a results bucket)."""
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

    return tqdm(
        iterable, desc=description, total=total, disable=not sys.stderr.isatty(), leave=False
    )
