import shutil

import cv2
import numpy as np
import pandas as pd
import pytest

from sketch_core.data import (
    load_rgb,
    read_test_table,
    read_train_table,
    split_indices,
    verify_images,
)
from sketch_core.errors import SketchError


@pytest.fixture
def data_copy(demo_dir, tmp_path):
    """A writable copy of the demo data to break in one way per test."""
    return shutil.copytree(demo_dir, tmp_path / "data")


def test_reads_the_competition_layout(demo_dir):
    table = read_train_table(demo_dir)
    assert table.num_classes == 8 and len(table.paths) == 320
    assert sorted(set(table.targets)) == list(range(8))
    assert table.class_names[int(table.targets[0])] == table.frame["class_name"].iloc[0]
    test = read_test_table(demo_dir)
    assert len(test.paths) == 80 and all(p.endswith(".JPEG") for p in test.paths)
    verify_images(table.paths[:20])


def edit_train_csv(data_dir, change):
    change(pd.read_csv(data_dir / "train.csv", dtype=str)).to_csv(
        data_dir / "train.csv", index=False
    )


def set_cell(row, column, value):
    def change(frame):
        frame.loc[row, column] = value
        return frame

    return change


@pytest.mark.parametrize(
    "change, message",
    [
        (
            lambda f: f.drop(columns="target"),
            "missing column(s) target; expected columns class_name,image_path,target",
        ),
        (set_cell(3, "target", "x"), "row 5: target 'x' is not an integer"),
        (set_cell(3, "target", "2.5"), "row 5: target '2.5' is not an integer"),
        (set_cell(3, "target", "8"), "row 5: target 8 out of range; expected 0..7 for 8 classes"),
        (set_cell(3, "target", "-1"), "row 5: target -1 out of range"),
        (set_cell(45, "target", "0"), "row 47: class_name"),
        (set_cell(3, "image_path", "nope/missing.JPEG"), "row 5: image"),
        (lambda f: f.iloc[:0], "train.csv: no rows"),
    ],
)
def test_bad_train_csv_is_one_clear_line(data_copy, change, message):
    edit_train_csv(data_copy, change)
    with pytest.raises(SketchError) as caught:
        read_train_table(data_copy)
    assert message in str(caught.value) and "train.csv" in str(caught.value)


def test_missing_data_dir_and_csv(tmp_path, data_copy):
    with pytest.raises(SketchError, match="data directory not found"):
        read_train_table(tmp_path / "nowhere")
    (data_copy / "test.csv").unlink()
    with pytest.raises(SketchError, match="test.csv: file not found"):
        read_test_table(data_copy)


def test_zero_byte_and_corrupt_images(data_copy):
    table = read_train_table(data_copy)
    open(table.paths[0], "wb").close()
    with pytest.raises(SketchError, match="zero-byte"):
        read_train_table(data_copy)
    with open(table.paths[0], "wb") as file:
        file.write(b"not a jpeg at all" * 10)
    with pytest.raises(SketchError, match="not a readable image"):
        verify_images(table.paths[:1])
    with pytest.raises(SketchError, match="cannot decode image"):
        load_rgb(table.paths[0])


def test_test_csv_naming_absent_file(data_copy):
    pd.DataFrame({"image_path": ["0.JPEG", "missing.JPEG"]}).to_csv(
        data_copy / "test.csv", index=False
    )
    with pytest.raises(SketchError, match=r"test.csv: row 3: image .*missing.JPEG not found"):
        read_test_table(data_copy)


def test_grayscale_and_rgba_become_rgb(tmp_path):
    gray = np.full((20, 30), 200, np.uint8)
    cv2.imwrite(str(tmp_path / "gray.png"), gray)
    rgba = np.zeros((20, 30, 4), np.uint8)  # fully transparent: composited on white
    cv2.imwrite(str(tmp_path / "rgba.png"), rgba)
    assert load_rgb(str(tmp_path / "gray.png")).shape == (20, 30, 3)
    assert (load_rgb(str(tmp_path / "rgba.png")) == 255).all()


def test_splits_are_stratified_seeded_and_disjoint():
    targets = np.repeat(np.arange(5), 10)
    train, val = split_indices(targets, val_fraction=0.2, seed=1)
    assert len(val) == 10 and np.bincount(targets[val]).tolist() == [2] * 5
    assert not set(train) & set(val)
    again = split_indices(targets, val_fraction=0.2, seed=1)
    assert (again[1] == val).all()
    assert not (split_indices(targets, val_fraction=0.2, seed=2)[1] == val).all()
    folds = [split_indices(targets, val_fraction=0.2, folds=5, fold=k, seed=0)[1] for k in range(5)]
    assert sorted(np.concatenate(folds).tolist()) == list(range(50))
    all_train, none = split_indices(targets, val_fraction=0.0)
    assert len(all_train) == 50 and len(none) == 0
    with pytest.raises(SketchError, match="need at least 12 images per class"):
        split_indices(targets, val_fraction=0.2, folds=12)


def test_splits_without_groups_are_the_ones_made_before_groups_existed():
    # Recorded from split_indices before it took groups.
    targets = np.repeat(np.arange(3), 5)
    assert split_indices(targets, val_fraction=0.4, seed=3)[1].tolist() == [0, 2, 5, 9, 12, 13]
    folds = [
        split_indices(targets, val_fraction=0.2, folds=3, fold=k, seed=4)[1].tolist()
        for k in range(3)
    ]
    assert folds == [[0, 2, 5, 9, 12], [1, 4, 6, 13, 14], [3, 7, 8, 10, 11]]


def grouped_classes(classes=6, images=30, seed=0):
    """Targets and group ids: each class's images in groups of 1 to 4, like copies made within a
    class."""
    rng = np.random.default_rng(seed)
    targets, groups = np.repeat(np.arange(classes), images), []
    for _ in range(classes):
        sizes = rng.integers(1, 5, size=images)
        groups += list(len(set(groups)) + np.repeat(np.arange(images), sizes)[:images])
    return targets, np.array(groups)


def sides_of_every_group(groups, train, val):
    return set(groups[train]) & set(groups[val])


@pytest.mark.parametrize(
    "val_fraction, share", [(0.1, 1 / 10), (0.15, 1 / 7), (0.2, 1 / 5), (0.3, 1 / 3), (0.8, 4 / 5)]
)
def test_grouped_split_keeps_groups_whole_stratified_and_near_val_fraction(val_fraction, share):
    targets, groups = grouped_classes()
    train, val = split_indices(targets, val_fraction=val_fraction, seed=1, groups=groups)
    assert not sides_of_every_group(groups, train, val)
    assert sorted(np.concatenate([train, val]).tolist()) == list(range(len(targets)))
    assert set(targets[train]) == set(range(6))
    per_class = np.bincount(targets[val], minlength=6) / 30
    assert np.abs(per_class - share).max() <= 4 / 30  # within the largest group of each class
    assert abs(len(val) / len(targets) - share) <= 0.03


def test_grouped_folds_keep_groups_whole_and_cover_every_image_once():
    targets, groups = grouped_classes()
    vals = []
    for fold in range(5):
        train, val = split_indices(
            targets, val_fraction=0.2, folds=5, fold=fold, seed=2, groups=groups
        )
        assert not sides_of_every_group(groups, train, val)
        assert set(targets[train]) == set(targets[val]) == set(range(6))
        vals.append(val)
    assert sorted(np.concatenate(vals).tolist()) == list(range(len(targets)))


def test_grouped_split_follows_the_seed():
    targets, groups = grouped_classes()
    first = split_indices(targets, val_fraction=0.2, seed=1, groups=groups)[1]
    assert (split_indices(targets, val_fraction=0.2, seed=1, groups=groups)[1] == first).all()
    assert set(split_indices(targets, val_fraction=0.2, seed=2, groups=groups)[1]) != set(first)
    assert set(split_indices(targets, val_fraction=0.2, seed=1, folds=5, groups=groups)[1]) != set(
        split_indices(targets, val_fraction=0.2, seed=2, folds=5, groups=groups)[1]
    )


def test_grouped_split_without_a_hold_out_is_all_training():
    targets, groups = grouped_classes()
    train, val = split_indices(targets, val_fraction=0.0, groups=groups)
    assert len(train) == len(targets) and len(val) == 0


@pytest.mark.parametrize(
    "split, message",
    [
        (
            dict(val_fraction=0.2),
            "val_fraction: a split that keeps groups whole needs at least 2 groups per class "
            r"\(near-duplicates are one group\); class 1 has 1",
        ),
        (
            dict(val_fraction=0.2, folds=3),
            "folds: .* needs at least 3 groups per class .*; class 1 has 1",
        ),
    ],
)
def test_grouped_split_refuses_a_class_with_too_few_groups(split, message):
    targets = np.repeat(np.arange(3), 4)
    groups = np.array(
        [0, 1, 2, 3, 4, 4, 4, 4, 5, 6, 7, 8]
    )  # class 1: one image and its three copies
    with pytest.raises(SketchError, match=message):
        split_indices(targets, groups=groups, **split)


def test_groups_must_name_every_image():
    with pytest.raises(SketchError, match="groups: 3 group ids for 4 images"):
        split_indices(np.array([0, 0, 1, 1]), val_fraction=0.5, groups=np.array([0, 1, 2]))
