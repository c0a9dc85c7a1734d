"""The competition's data layout: reading and validating the CSVs, decoding images, splitting.

Layout (ARCHITECTURE.md, "Data contract")::

    DATA_DIR/train.csv   class_name,image_path,target   (image_path relative to DATA_DIR/train)
    DATA_DIR/test.csv    image_path                     (image_path relative to DATA_DIR/test)
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from PIL import Image
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold, train_test_split

from sketch_core.errors import SketchError

TRAIN_COLUMNS = ("class_name", "image_path", "target")
TEST_COLUMNS = ("image_path",)


@dataclass(frozen=True)
class TrainTable:
    """train.csv, validated: ``paths`` are absolute, ``targets`` are 0..num_classes-1."""

    frame: pd.DataFrame
    paths: list[str]
    targets: np.ndarray
    class_names: list[str]  # indexed by target

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


@dataclass(frozen=True)
class TestTable:
    frame: pd.DataFrame
    paths: list[str]


def read_train_table(data_dir: str | Path) -> TrainTable:
    data_dir = _existing_dir(data_dir)
    frame = _read_csv(data_dir / "train.csv", TRAIN_COLUMNS)
    targets = _integer_targets(frame, data_dir / "train.csv")
    class_names = _class_names_by_target(frame, targets, data_dir / "train.csv")
    paths = _existing_images(frame, data_dir / "train", data_dir / "train.csv")
    return TrainTable(frame=frame, paths=paths, targets=targets, class_names=class_names)


def read_test_table(data_dir: str | Path) -> TestTable:
    data_dir = _existing_dir(data_dir)
    frame = _read_csv(data_dir / "test.csv", TEST_COLUMNS)
    return TestTable(
        frame=frame, paths=_existing_images(frame, data_dir / "test", data_dir / "test.csv")
    )


def verify_images(paths: list[str]) -> None:
    """Check every image's header and structure without decoding pixels (fast enough for 25k
    files)."""
    for path in paths:
        try:
            with Image.open(path) as image:
                image.verify()
        except Exception as exc:  # PIL raises many types for a corrupt file
            raise SketchError(
                f"{path}: not a readable image ({type(exc).__name__}: {exc})"
            ) from None


def load_rgb(path: str) -> np.ndarray:
    """Decode an image as HxWx3 uint8 RGB: grayscale is replicated, alpha is composited on white."""
    image = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    if image is None:
        raise SketchError(f"{path}: cannot decode image (missing, empty or corrupt)")
    if image.dtype != np.uint8:
        image = cv2.convertScaleAbs(image, alpha=255.0 / max(float(image.max()), 1.0))
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    if image.shape[2] == 4:
        alpha = image[:, :, 3:4].astype(np.float32) / 255.0
        image = (image[:, :, :3].astype(np.float32) * alpha + 255.0 * (1.0 - alpha)).astype(
            np.uint8
        )
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def split_indices(
    targets: np.ndarray,
    *,
    val_fraction: float,
    folds: int = 0,
    fold: int = 0,
    seed: int = 0,
    groups: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded stratified (train, val) indices: one hold-out split, fold ``fold`` of ``folds``, or
    all-train.

    ``groups`` (an integer group id per image, e.g. ``duplicates.duplicate_groups``) keeps each
    group on one side: sklearn's StratifiedGroupKFold makes the folds, and the hold-out split is one
    fold of ``round(1 / val_fraction)``, so its share is about ``val_fraction`` (0.2: 1/5; 0.15:
    1/7 = 0.14; 0.3: 1/3; above 0.5 the training side is the one fold of
    ``round(1 / (1 - val_fraction))``). Every class needs at least 2 groups (``folds`` groups with
    folds) so that it stays in training."""
    everything = np.arange(len(targets))
    if groups is not None and (folds or val_fraction):
        return _grouped_split(
            np.asarray(targets, dtype=np.int64),
            np.asarray(groups, dtype=np.int64),
            val_fraction=val_fraction,
            folds=folds,
            fold=fold,
            seed=seed,
        )
    if folds:
        min_count = np.bincount(targets).min()
        if min_count < folds:
            raise SketchError(
                f"folds: {folds} folds need at least {folds} images per class, "
                f"the smallest class has {min_count}"
            )
        splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
        train_idx, val_idx = list(splitter.split(everything, targets))[fold]
        return train_idx, val_idx
    if val_fraction == 0:
        return everything, everything[:0]
    try:
        train_idx, val_idx = train_test_split(
            everything, test_size=val_fraction, stratify=targets, random_state=seed
        )
    except ValueError as exc:
        raise SketchError(
            f"val_fraction: cannot make a stratified split of {len(targets)} images ({exc})"
        ) from None
    return np.sort(train_idx), np.sort(val_idx)


def _grouped_split(
    targets: np.ndarray,
    groups: np.ndarray,
    *,
    val_fraction: float,
    folds: int,
    fold: int,
    seed: int,
) -> tuple[np.ndarray, np.ndarray]:
    if len(groups) != len(targets):
        raise SketchError(
            f"groups: {len(groups)} group ids for {len(targets)} images; expected one per image"
        )
    field, needed = ("folds", folds) if folds else ("val_fraction", 2)
    class_and_group = np.unique(
        np.column_stack([targets, groups]), axis=0
    )  # each (class, group) once
    classes, groups_per_class = np.unique(class_and_group[:, 0], return_counts=True)
    fewest = int(np.argmin(groups_per_class))
    if groups_per_class[fewest] < needed:
        raise SketchError(
            f"{field}: a split that keeps groups whole needs at least {needed} groups per class "
            "(near-duplicates are one group); "
            f"class {classes[fewest]} has {groups_per_class[fewest]}"
        )
    n_splits = folds or max(2, round(1 / min(val_fraction, 1 - val_fraction)))
    try:
        fold_of = _group_folds(targets.tobytes(), groups.tobytes(), n_splits, seed)
    except ValueError as exc:
        raise SketchError(
            f"{field}: cannot split {len(targets)} images into {n_splits} folds of whole groups "
            f"({exc})"
        ) from None
    if folds:
        held_out = fold_of == fold
    else:  # the one fold is the smaller side
        held_out = fold_of == 0 if val_fraction <= 0.5 else fold_of != 0
    return np.flatnonzero(~held_out), np.flatnonzero(held_out)


# Memoised: StratifiedGroupKFold's greedy assignment took 8 s of CPU for 15k images of 500 classes
# (2-core machine), and a reused head-trial process splits the same images for every trial.
@functools.lru_cache(maxsize=4)
def _group_folds(targets: bytes, groups: bytes, n_splits: int, seed: int) -> np.ndarray:
    """The StratifiedGroupKFold fold of each image (int64 ``targets`` and ``groups`` as bytes, so
    hashable)."""
    targets_array, groups_array = (
        np.frombuffer(targets, dtype=np.int64),
        np.frombuffer(groups, dtype=np.int64),
    )
    fold_of = np.empty(len(targets_array), dtype=np.int64)
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    with (
        warnings.catch_warnings()
    ):  # a class smaller than n_splits misses some folds, and stays in training
        warnings.filterwarnings("ignore", "The least populated class", UserWarning)
        for k, (_, in_fold) in enumerate(
            splitter.split(targets_array, targets_array, groups_array)
        ):
            fold_of[in_fold] = k
    fold_of.flags.writeable = False  # shared by every caller of the cache
    return fold_of


def _existing_dir(data_dir: str | Path) -> Path:
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise SketchError(
            f"{data_dir}: data directory not found (expected train.csv, test.csv, train/, test/)"
        )
    return data_dir


def _read_csv(path: Path, columns: tuple[str, ...]) -> pd.DataFrame:
    if not path.is_file():
        raise SketchError(f"{path}: file not found")
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise SketchError(f"{path}: not a readable CSV ({exc})") from None
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise SketchError(
            f"{path}: missing column(s) {', '.join(missing)}; expected columns {','.join(columns)}"
        )
    if frame.empty:
        raise SketchError(f"{path}: no rows")
    return frame


def _integer_targets(frame: pd.DataFrame, path: Path) -> np.ndarray:
    numbers = pd.to_numeric(frame["target"], errors="coerce")
    bad = numbers.isna() | (numbers != numbers.round())
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise SketchError(
            f"{path}: row {row + 2}: target {frame['target'].iloc[row]!r} is not an integer"
        )
    return numbers.to_numpy().astype(np.int64)


def _class_names_by_target(frame: pd.DataFrame, targets: np.ndarray, path: Path) -> list[str]:
    num_classes = frame["class_name"].nunique()
    out_of_range = (targets < 0) | (targets >= num_classes)
    if out_of_range.any():
        row = int(np.flatnonzero(out_of_range)[0])
        raise SketchError(
            f"{path}: row {row + 2}: target {targets[row]} out of range; "
            f"expected 0..{num_classes - 1} "
            f"for {num_classes} classes"
        )
    names: dict[int, str] = {}
    for row, (name, target) in enumerate(zip(frame["class_name"], targets)):
        if names.setdefault(int(target), name) != name:
            raise SketchError(
                f"{path}: row {row + 2}: class_name {name!r} has target {target}, "
                f"which row(s) above give to class_name {names[int(target)]!r}"
            )
    # Each target has one name and all targets lie in 0..K-1 for K names, so by counting every
    # target occurs and no name has two targets.
    return [names[t] for t in range(num_classes)]


def _existing_images(frame: pd.DataFrame, image_root: Path, csv_path: Path) -> list[str]:
    paths = [str(image_root / rel) for rel in frame["image_path"]]
    for row, path in enumerate(paths):
        if not frame["image_path"].iloc[row]:
            raise SketchError(f"{csv_path}: row {row + 2}: empty image_path")
        try:
            size = Path(path).stat().st_size
        except OSError:
            raise SketchError(f"{csv_path}: row {row + 2}: image {path} not found") from None
        if size == 0:
            raise SketchError(
                f"{csv_path}: row {row + 2}: image {path} is an empty (zero-byte) file"
            )
    return paths
