"""What the command-line scripts share: one-line errors, local paths made absolute, the demo data
folder."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

from sketch_core.errors import SketchError

# Ray Train's default 30 s is too short for a worker group on 2 CPUs or a node that autoscales.
os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "600")


# Environment variables naming local folders that Ray workers open.
PATH_VARIABLES = ("SKETCH_CACHE_DIR",)


def local_path(value: str) -> str:
    """``value`` as an absolute path when it is a local one (resolved against this process's working
    directory), unchanged when empty or a URI (``s3://...``). Ray Train runs every worker in a
    working directory of its own, so every local path a worker opens passes through here on the
    driver first (ARCHITECTURE.md, "Paths")."""
    if not value or "://" in value:
        return value
    return str(Path(value).expanduser().resolve())


def pin_environment_paths() -> None:
    """Make the folders named in ``PATH_VARIABLES`` absolute in this driver's environment, which
    local Ray's workers inherit and ``worker_env`` hands to a cluster's."""
    for name in PATH_VARIABLES:
        if os.environ.get(name):
            os.environ[name] = local_path(os.environ[name])


def run_cli(body: Callable[[], None], *, after_interrupt: str) -> int:
    """Run a command: bad input is one ``error:`` line on stderr and exit status 2, no traceback;
    Ctrl-C is one line saying what to do next (``after_interrupt``) and exit status 130."""
    pin_environment_paths()
    try:
        body()
    except SketchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted; {after_interrupt}", file=sys.stderr)
        return 130
    return 0


def ensure_data_dir(data_dir: str, *, demo: bool) -> str:
    """The absolute data folder; the demo data set is generated only where a space marks it demo."""
    path = Path(local_path(data_dir))
    if not path.exists() and demo:
        from sketch_core.demo_data import generate

        print(f"{data_dir}: not found; generating the demo data set there", flush=True)
        try:
            generate(path)
        except FileExistsError:
            pass  # another process generated it first
    return str(path)
