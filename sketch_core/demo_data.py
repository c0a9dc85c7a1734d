"""Deterministic synthetic stand-in for the sketch competition data set.

Writes the same layout as the real data::

    OUT_DIR/train.csv          class_name,image_path,target
    OUT_DIR/test.csv           image_path
    OUT_DIR/test_answers.csv   image_path,target   (labels for test.csv, kept apart)
    OUT_DIR/duplicates.csv     image_path,original,kind   (only with planted near-duplicates)
    OUT_DIR/train/<class_name>/sketch_<k>.JPEG
    OUT_DIR/test/<k>.JPEG

Each class is a base shape combined with a drawing variant (plain outline, inner
concentric copy, hatched fill, centre dot).  Every image is drawn at its own size
with hand-drawn wobble, random placement, scale, rotation, stretch, stroke width,
occasional stray strokes and horizontal flips.

Like ImageNet-Sketch, whose authors filled small classes by flipping and rotating images, the
training set can hold near-duplicates (``duplicates``): copies of a fraction of the training images
within their class (a mirror, a quarter turn, a small rotation or a rescaled re-encode) under file
names of their own, listed with their originals in ``duplicates.csv``.

Usage: ``python -m sketch_core.demo_data OUT_DIR [--classes N] [--seed S] ...``
"""

from __future__ import annotations

import argparse
import csv
import errno
import math
import os
import secrets
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np


@dataclass(frozen=True)
class Shape:
    strokes: tuple[np.ndarray, ...]  # polylines in unit coordinates, y pointing down
    region: np.ndarray  # closed polygon bounding the shape's inside, used for hatching


def _closed(points: np.ndarray) -> np.ndarray:
    return np.vstack([points, points[:1]])


def _regular_polygon(corners: int, phase: float) -> np.ndarray:
    angles = phase + 2 * np.pi * np.arange(corners) / corners
    return np.column_stack([np.cos(angles), np.sin(angles)])


def _star(points: int, inner_radius: float) -> np.ndarray:
    angles = -np.pi / 2 + np.pi * np.arange(2 * points) / points
    radii = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner_radius)
    return np.column_stack([radii * np.cos(angles), radii * np.sin(angles)])


def _polar_curve(radius_of_angle, samples: int = 96) -> np.ndarray:
    angles = np.linspace(0, 2 * np.pi, samples, endpoint=False)
    radii = radius_of_angle(angles)
    return np.column_stack([radii * np.cos(angles), radii * np.sin(angles)])


def _heart() -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, 80, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    return np.column_stack([x, y + 2.5]) / 16.5


def _crescent() -> np.ndarray:
    outer = np.linspace(np.pi / 3, 5 * np.pi / 3, 40)
    inner = np.linspace(3 * np.pi / 2, np.pi / 2, 30)
    inner_radius = math.sin(np.pi / 3)
    return np.vstack(
        [
            np.column_stack([np.cos(outer), np.sin(outer)]),
            np.column_stack([0.5 + inner_radius * np.cos(inner), inner_radius * np.sin(inner)]),
        ]
    )


def _spiral() -> np.ndarray:
    t = np.linspace(0, 1, 120)
    angles = 2.5 * 2 * np.pi * t
    radii = 0.1 + 0.9 * t
    return np.column_stack([radii * np.cos(angles), radii * np.sin(angles)])


def _outline(points) -> Shape:
    points = np.asarray(points, dtype=np.float64)
    return Shape(strokes=(_closed(points),), region=points)


def _open_stroke(points) -> Shape:
    points = np.asarray(points, dtype=np.float64)
    hull = cv2.convexHull(points.astype(np.float32)).reshape(-1, 2).astype(np.float64)
    return Shape(strokes=(points,), region=hull)


def _house() -> Shape:
    walls_and_roof = np.array(
        [
            [-0.7, 0.9],
            [0.7, 0.9],
            [0.7, -0.1],
            [0.9, -0.1],
            [0.0, -1.0],
            [-0.9, -0.1],
            [-0.7, -0.1],
        ]
    )
    door = np.array([[-0.2, 0.9], [-0.2, 0.35], [0.2, 0.35], [0.2, 0.9]])
    return Shape(strokes=(_closed(walls_and_roof), door), region=walls_and_roof)


def _base_shapes() -> dict[str, Shape]:
    return {
        "circle": _outline(_polar_curve(lambda a: np.ones_like(a))),
        "triangle": _outline(_regular_polygon(3, -np.pi / 2)),
        "square": _outline(_regular_polygon(4, np.pi / 4)),
        "pentagon": _outline(_regular_polygon(5, -np.pi / 2)),
        "hexagon": _outline(_regular_polygon(6, 0.0)),
        "star5": _outline(_star(5, 0.42)),
        "star7": _outline(_star(7, 0.55)),
        "cross": _outline(
            [
                [-0.3, -1],
                [0.3, -1],
                [0.3, -0.3],
                [1, -0.3],
                [1, 0.3],
                [0.3, 0.3],
                [0.3, 1],
                [-0.3, 1],
                [-0.3, 0.3],
                [-1, 0.3],
                [-1, -0.3],
                [-0.3, -0.3],
            ]
        ),
        "arrow": _outline(
            [
                [-1, -0.2],
                [0.2, -0.2],
                [0.2, -0.6],
                [1, 0],
                [0.2, 0.6],
                [0.2, 0.2],
                [-1, 0.2],
            ]
        ),
        "spiral": _open_stroke(_spiral()),
        "heart": _outline(_heart()),
        "house": _house(),
        "zigzag": _open_stroke(
            np.column_stack([np.linspace(-1, 1, 7), 0.5 * (-1.0) ** np.arange(7)])
        ),
        "crescent": _outline(_crescent()),
        "cloud": _outline(_polar_curve(lambda a: 0.75 + 0.25 * np.abs(np.sin(3.5 * a)))),
        "lightning": _outline(
            [
                [0.25, -1],
                [-0.5, 0.1],
                [0.0, 0.1],
                [-0.25, 1],
                [0.5, -0.15],
                [0.0, -0.15],
            ]
        ),
    }


SHAPES = _base_shapes()
VARIANTS = ("plain", "concentric", "hatched", "dotted")
MAX_CLASSES = len(SHAPES) * len(VARIANTS)
SHAPE_NAMES = tuple(SHAPES)
GRAYSCALE_FRACTION = 0.25
JPEG_QUALITY = (85, 95)  # of every image written, except re-encoded copies
COPY_KINDS = ("mirror", "quarter_turn", "small_rotation", "reencode")
SMALL_ROTATION_DEGREES = (5.0, 10.0)  # either way
REENCODE_QUALITY = (60, 80)
REENCODE_SCALE = (0.9, 1.1)
WHITE = (255, 255, 255)


def class_name(target: int) -> str:
    """WordNet-id-like folder name of a class, e.g. ``n90000007``."""
    return f"n{90000000 + target}"


def class_design(target: int) -> tuple[str, str]:
    """(base shape, variant) drawn for a class.

    Shapes cycle fastest so that any number of classes covers as many base shapes as
    possible; from ``len(SHAPES) + 1`` classes on, shapes reappear with another variant.
    """
    return SHAPE_NAMES[target % len(SHAPES)], VARIANTS[target // len(SHAPES)]


def _resample(polyline: np.ndarray, spacing: float) -> np.ndarray:
    segment_lengths = np.linalg.norm(np.diff(polyline, axis=0), axis=1)
    arc_length = np.concatenate([[0.0], np.cumsum(segment_lengths)])
    count = max(2, int(arc_length[-1] / spacing) + 1)
    positions = np.linspace(0, arc_length[-1], count)
    return np.column_stack([np.interp(positions, arc_length, polyline[:, axis]) for axis in (0, 1)])


def _wobble(polyline: np.ndarray, amplitude: float, rng: np.random.Generator) -> np.ndarray:
    """Hand-drawn look: smooth low-frequency drift plus a little tremor along the stroke."""
    points = _resample(polyline, spacing=max(1.5, amplitude))
    count = len(points)
    knots = max(3, count // 12)
    knot_offsets = rng.normal(0, amplitude, size=(knots, 2))
    knot_positions = np.linspace(0, count - 1, knots)
    drift = np.column_stack(
        [np.interp(np.arange(count), knot_positions, knot_offsets[:, axis]) for axis in (0, 1)]
    )
    tremor = rng.normal(0, amplitude * 0.15, size=(count, 2))
    return points + drift + tremor


def _draw_polyline(ink: np.ndarray, points: np.ndarray, thickness: int) -> None:
    subpixel_bits = 4
    fixed_point = np.round(points * (1 << subpixel_bits)).astype(np.int32)
    cv2.polylines(ink, [fixed_point], False, 255, thickness, cv2.LINE_AA, subpixel_bits)


def _hatch_lines(region: np.ndarray, spacing: float, angle: float) -> list[np.ndarray]:
    direction = np.array([math.cos(angle), math.sin(angle)])
    normal = np.array([-direction[1], direction[0]])
    centre = region.mean(axis=0)
    reach = np.linalg.norm(region - centre, axis=1).max()
    offsets = np.arange(-reach, reach, spacing) + spacing / 2
    return [
        np.array([centre + o * normal - reach * direction, centre + o * normal + reach * direction])
        for o in offsets
    ]


def _stray_strokes(width: int, height: int, rng: np.random.Generator) -> list[np.ndarray]:
    strokes = []
    for _ in range(rng.integers(1, 4)):
        start = rng.uniform([0, 0], [width, height])
        steps = rng.normal(0, 0.06 * min(width, height), size=(rng.integers(2, 5), 2))
        strokes.append(np.vstack([start, start + np.cumsum(steps, axis=0)]))
    return strokes


def render_sketch(target: int, width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """Draw one sketch of class ``target`` as an (height, width, 3) uint8 BGR image."""
    shape_name, variant = class_design(target)
    shape = SHAPES[shape_name]
    short_side = min(width, height)

    radius = short_side * rng.uniform(0.25, 0.42)
    stretch = rng.uniform(0.8, 1.25)
    rotation = math.radians(rng.uniform(-25, 25))
    cos_r, sin_r = math.cos(rotation), math.sin(rotation)
    linear = radius * np.array([[cos_r, -sin_r], [sin_r, cos_r]]) @ np.diag([stretch, 1 / stretch])

    half_extent = np.abs(shape.region @ linear.T).max(axis=0)
    canvas_size = np.array([width, height], dtype=np.float64)
    # A shape wider than its canvas is centred and cropped rather than squeezed.
    low, high = half_extent, canvas_size - half_extent
    centre = np.where(
        low < high, rng.uniform(np.minimum(low, high), np.maximum(low, high)), canvas_size / 2
    )

    def place(unit_points: np.ndarray, scale: float = 1.0) -> np.ndarray:
        return (scale * unit_points) @ linear.T + centre

    thickness = max(1, round(short_side * rng.uniform(0.007, 0.02)))
    wobble = radius * rng.uniform(0.015, 0.045)

    ink = np.zeros((height, width), dtype=np.uint8)
    outline_scales = (1.0, rng.uniform(0.45, 0.6)) if variant == "concentric" else (1.0,)
    for scale in outline_scales:
        for stroke in shape.strokes:
            _draw_polyline(ink, _wobble(place(stroke, scale), wobble, rng), thickness)

    if variant == "hatched":
        hatch_ink = np.zeros_like(ink)
        region = place(shape.region)
        for line in _hatch_lines(region, radius * rng.uniform(0.14, 0.22), rng.uniform(0, np.pi)):
            _draw_polyline(hatch_ink, _wobble(line, wobble, rng), max(1, thickness - 1))
        inside = np.zeros_like(ink)
        cv2.fillPoly(inside, [np.round(region).astype(np.int32)], 255, cv2.LINE_AA)
        np.maximum(ink, np.minimum(hatch_ink, inside), out=ink)
    elif variant == "dotted":
        dot_centre = centre + rng.normal(0, 0.04 * radius, size=2)
        dot_radius = max(1, round(radius * rng.uniform(0.08, 0.13)))
        cv2.circle(
            ink, tuple(int(v) for v in np.round(dot_centre)), dot_radius, 255, -1, cv2.LINE_AA
        )

    if rng.random() < 0.3:
        for stroke in _stray_strokes(width, height, rng):
            _draw_polyline(ink, _wobble(stroke, wobble, rng), thickness)

    if rng.random() < 0.3:
        ink = cv2.flip(ink, 1)

    paper = rng.uniform(238, 255)
    pen = np.clip(rng.uniform(0, 80) + rng.normal(0, 10, size=3), 0, 255)
    coverage = np.arange(256)[:, None] / 255
    colour_of_ink = np.round(paper + coverage * (pen - paper)).astype(np.uint8)
    return cv2.LUT(cv2.merge([ink, ink, ink]), colour_of_ink.reshape(256, 1, 3))


def _encode_jpeg(image: np.ndarray, grayscale: bool, quality: int) -> bytes:
    if grayscale:
        image = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    ok, encoded = cv2.imencode(".JPEG", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError("cv2 failed to encode a JPEG")
    return encoded.tobytes()


def _write_image(
    path: Path,
    target: int,
    grayscale: bool,
    min_size: int,
    max_size: int,
    seed_sequence: np.random.SeedSequence,
) -> None:
    rng = np.random.default_rng(seed_sequence)
    width, height = (int(v) for v in rng.integers(min_size, max_size, size=2, endpoint=True))
    image = render_sketch(target, width, height, rng)
    path.write_bytes(
        _encode_jpeg(image, grayscale, int(rng.integers(*JPEG_QUALITY, endpoint=True)))
    )


def _near_duplicate(
    image: np.ndarray, kind: str, min_size: int, max_size: int, rng: np.random.Generator
) -> tuple[np.ndarray, int]:
    """A copy of BGR ``image`` of kind ``kind`` (one of COPY_KINDS), and the JPEG quality to write
    it at.

    A re-encode is rescaled slightly, each side kept within ``min_size``..``max_size``; a small
    rotation keeps the canvas and fills the corners it uncovers with white."""
    quality = int(
        rng.integers(*(REENCODE_QUALITY if kind == "reencode" else JPEG_QUALITY), endpoint=True)
    )
    if kind == "mirror":
        return cv2.flip(image, 1), quality
    if kind == "quarter_turn":
        turn = (cv2.ROTATE_90_CLOCKWISE, cv2.ROTATE_180, cv2.ROTATE_90_COUNTERCLOCKWISE)[
            rng.integers(3)
        ]
        return cv2.rotate(image, turn), quality
    height, width = image.shape[:2]
    if kind == "small_rotation":
        angle = rng.choice([-1.0, 1.0]) * rng.uniform(*SMALL_ROTATION_DEGREES)
        rotation = cv2.getRotationMatrix2D((width / 2, height / 2), angle, 1.0)
        return cv2.warpAffine(
            image,
            rotation,
            (width, height),
            flags=cv2.INTER_LINEAR,
            borderMode=cv2.BORDER_CONSTANT,
            borderValue=WHITE,
        ), quality
    size = np.clip(
        np.round(np.array([width, height]) * rng.uniform(*REENCODE_SCALE)), min_size, max_size
    )
    return cv2.resize(
        image, tuple(int(v) for v in size), interpolation=cv2.INTER_AREA
    ), quality  # a re-encode


def _write_copy(
    path: Path,
    original: Path,
    kind: str,
    grayscale: bool,
    min_size: int,
    max_size: int,
    seed_sequence: np.random.SeedSequence,
) -> None:
    image = cv2.imread(
        str(original), cv2.IMREAD_COLOR
    )  # the original as written: copies of the file
    copy, quality = _near_duplicate(
        image, kind, min_size, max_size, np.random.default_rng(seed_sequence)
    )
    path.write_bytes(_encode_jpeg(copy, grayscale, quality))


def _write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def known_answers(data_dir, image_paths) -> np.ndarray | None:
    """The targets of ``image_paths`` (test.csv's) in their order, from the demo data's
    test_answers.csv; None where there is no such file (real competition data)."""
    answers_file = Path(data_dir) / "test_answers.csv"
    if not answers_file.is_file():
        return None
    with answers_file.open(newline="") as file:
        answers = {row["image_path"]: int(row["target"]) for row in csv.DictReader(file)}
    return np.array([answers[path] for path in image_paths])


def _grayscale_mask(count: int, rng: np.random.Generator) -> np.ndarray:
    mask = np.zeros(count, dtype=bool)
    mask[rng.permutation(count)[: round(count * GRAYSCALE_FRACTION)]] = True
    return mask


def planted_copies(originals: int, duplicates: float) -> int:
    """How many near-duplicates ``duplicates`` (a fraction) plants among ``originals`` training
    images."""
    return round(duplicates * originals)


def _plan_copies(
    seed_sequence: np.random.SeedSequence, originals: int, duplicates: float
) -> list[tuple[int, str, np.random.SeedSequence]]:
    """(original's index, kind, seed) of each planted copy: distinct originals, in index order, the
    kinds in equal shares."""
    count = planted_copies(originals, duplicates)
    choice_seed, *copy_seeds = seed_sequence.spawn(count + 1)
    rng = np.random.default_rng(choice_seed)
    chosen = np.sort(rng.choice(originals, size=count, replace=False)).tolist()
    kinds = [COPY_KINDS[k] for k in rng.permutation(np.arange(count) % len(COPY_KINDS))]
    return list(zip(chosen, kinds, copy_seeds))


def _train_image(name: str, k: int) -> str:
    return f"{name}/sketch_{k}.JPEG"


def _write_dataset(
    root: Path,
    classes: int,
    images_per_class: int,
    test_images: int,
    min_size: int,
    max_size: int,
    seed: int,
    duplicates: float,
) -> None:
    # A fourth child leaves the first three, and so the data without copies, as they were.
    plan_seed, train_seed, test_seed, copy_seed = np.random.SeedSequence(seed).spawn(4)
    plan_rng = np.random.default_rng(plan_seed)
    test_targets = plan_rng.permutation(np.arange(test_images) % classes)
    train_grayscale = _grayscale_mask(classes * images_per_class, plan_rng)
    test_grayscale = _grayscale_mask(test_images, plan_rng)

    train_rows, duplicate_rows = [], []
    train_seeds = train_seed.spawn(classes * images_per_class)
    copies = _plan_copies(copy_seed, classes * images_per_class, duplicates)
    for target in range(classes):
        name = class_name(target)
        (root / "train" / name).mkdir(parents=True)
        for k in range(images_per_class):
            index = target * images_per_class + k
            relative = _train_image(name, k)
            _write_image(
                root / "train" / relative,
                target,
                bool(train_grayscale[index]),
                min_size,
                max_size,
                train_seeds[index],
            )
            train_rows.append([name, relative, target])
        class_copies = [copy for copy in copies if copy[0] // images_per_class == target]
        for k, (index, kind, seed_sequence) in enumerate(class_copies, start=images_per_class):
            relative, original = _train_image(name, k), _train_image(name, index % images_per_class)
            _write_copy(
                root / "train" / relative,
                root / "train" / original,
                kind,
                bool(train_grayscale[index]),
                min_size,
                max_size,
                seed_sequence,
            )
            train_rows.append([name, relative, target])
            duplicate_rows.append([relative, original, kind])

    (root / "test").mkdir()
    test_rows = []
    for k, (target, image_seed) in enumerate(
        zip(test_targets.tolist(), test_seed.spawn(test_images))
    ):
        _write_image(
            root / "test" / f"{k}.JPEG",
            target,
            bool(test_grayscale[k]),
            min_size,
            max_size,
            image_seed,
        )
        test_rows.append([f"{k}.JPEG", target])

    _write_csv(root / "train.csv", ["class_name", "image_path", "target"], train_rows)
    _write_csv(root / "test.csv", ["image_path"], [[path] for path, _ in test_rows])
    _write_csv(root / "test_answers.csv", ["image_path", "target"], test_rows)
    if duplicate_rows:
        _write_csv(root / "duplicates.csv", ["image_path", "original", "kind"], duplicate_rows)


def _validate(
    classes: int,
    images_per_class: int,
    test_images: int,
    min_size: int,
    max_size: int,
    seed: int,
    duplicates: float,
) -> None:
    if not 2 <= classes <= MAX_CLASSES:
        raise ValueError(f"classes must be between 2 and {MAX_CLASSES}, got {classes}")
    if images_per_class < 2:
        raise ValueError(f"images_per_class must be at least 2, got {images_per_class}")
    if test_images < 1:
        raise ValueError(f"test_images must be at least 1, got {test_images}")
    if min_size < 16:
        raise ValueError(f"min_size must be at least 16 px, got {min_size}")
    if min_size > max_size:
        raise ValueError(f"min_size ({min_size}) must not exceed max_size ({max_size})")
    if seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed}")
    if not 0 <= duplicates <= 1:
        raise ValueError(f"duplicates must be a fraction between 0 and 1, got {duplicates}")


def _already_exists(target: Path) -> FileExistsError:
    return FileExistsError(f"{target} already exists and is not empty; refusing to overwrite it")


def generate(
    out_dir,
    *,
    classes: int = 24,
    images_per_class: int = 30,
    test_images: int = 240,
    min_size: int = 150,
    max_size: int = 800,
    seed: int = 0,
    duplicates: float = 0.0,
) -> Path:
    """Write a synthetic sketch data set in the competition layout to ``out_dir``.

    The output depends only on the arguments: the same options and seed give
    byte-identical files.  Test labels are balanced round-robin over the classes in
    a seeded random order and are written to ``test_answers.csv``, never to
    ``test.csv``.  Roughly a quarter of the images are single-channel JPEGs.
    ``duplicates`` (a fraction of the training images) plants that many near-duplicates
    in the training set, each kind of COPY_KINDS an equal share, listed in
    ``duplicates.csv``; with 0 (the default) nothing is planted and no such file written.

    The data set is built in a hidden sibling directory and renamed into place, so
    ``out_dir`` is either absent, left as it was, or complete.  An existing empty
    ``out_dir`` is replaced; a non-empty one raises FileExistsError.  When another
    process finishes the same ``out_dir`` first, this call removes its own partial
    copy and raises FileExistsError, leaving the winner's data untouched.  A process
    killed outright can leave a ``.<name>.partial-*`` sibling behind; it is never
    read and can be deleted.

    Returns the absolute path of the data set.  Raises ValueError for arguments out
    of range (2 <= classes <= MAX_CLASSES, images_per_class >= 2, test_images >= 1,
    16 <= min_size <= max_size, seed >= 0, 0 <= duplicates <= 1).
    """
    _validate(classes, images_per_class, test_images, min_size, max_size, seed, duplicates)
    target = Path(out_dir).resolve()
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise _already_exists(target)

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.partial-{os.getpid()}-{secrets.token_hex(4)}"
    staging.mkdir()
    try:
        _write_dataset(
            staging, classes, images_per_class, test_images, min_size, max_size, seed, duplicates
        )
        try:
            os.rename(staging, target)
        except OSError as error:
            if error.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
                raise _already_exists(target) from None
            raise
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


class _OneLineErrorParser(argparse.ArgumentParser):
    def error(self, message: str):
        self.exit(2, f"error: {message}\n")


def main(argv: list[str] | None = None) -> int:
    parser = _OneLineErrorParser(
        prog="python -m sketch_core.demo_data",
        description="Generate a deterministic synthetic sketch data set in the competition layout.",
    )
    parser.add_argument("out_dir", type=Path, help="directory to create (must be absent or empty)")
    parser.add_argument(
        "--classes", type=int, metavar="N", default=24, help=f"number of classes, 2..{MAX_CLASSES}"
    )
    parser.add_argument(
        "--images-per-class", type=int, metavar="N", default=30, help="training images per class"
    )
    parser.add_argument(
        "--test-images", type=int, metavar="N", default=240, help="number of test images"
    )
    parser.add_argument(
        "--min-size", type=int, metavar="PX", default=150, help="smallest image side in pixels"
    )
    parser.add_argument(
        "--max-size", type=int, metavar="PX", default=800, help="largest image side in pixels"
    )
    parser.add_argument("--seed", type=int, metavar="S", default=0, help="random seed")
    parser.add_argument(
        "--duplicates",
        type=float,
        metavar="F",
        default=0.0,
        help="fraction of training images that get a planted near-duplicate in their class "
        "(mirror, quarter turn, 5-10 degree rotation or re-encode; listed in duplicates.csv)",
    )
    args = parser.parse_args(argv)
    try:
        written = generate(
            args.out_dir,
            classes=args.classes,
            images_per_class=args.images_per_class,
            test_images=args.test_images,
            min_size=args.min_size,
            max_size=args.max_size,
            seed=args.seed,
            duplicates=args.duplicates,
        )
    except (ValueError, OSError) as error:
        parser.error(str(error))
    originals = args.classes * args.images_per_class
    copies = planted_copies(originals, args.duplicates)
    print(
        f"wrote {originals + copies} train ({copies} of them planted near-duplicates) "
        f"and {args.test_images} test images ({args.classes} classes, seed {args.seed}) "
        f"to {written}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
