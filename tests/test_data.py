import shutil

import cv2
import numpy as np
import pandas as pd
import pytest

from sketch_core.data import load_rgb, read_test_table, read_train_table, split_indices, verify_images
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
    change(pd.read_csv(data_dir / "train.csv", dtype=str)).to_csv(data_dir / "train.csv", index=False)


def set_cell(row, column, value):
    def change(frame):
        frame.loc[row, column] = value
        return frame
    return change


@pytest.mark.parametrize("change, message", [
    (lambda f: f.drop(columns="target"), "missing column(s) target; expected columns class_name,image_path,target"),
    (set_cell(3, "target", "x"), "row 5: target 'x' is not an integer"),
    (set_cell(3, "target", "2.5"), "row 5: target '2.5' is not an integer"),
    (set_cell(3, "target", "8"), "row 5: target 8 out of range; expected 0..7 for 8 classes"),
    (set_cell(3, "target", "-1"), "row 5: target -1 out of range"),
    (set_cell(45, "target", "0"), "row 47: class_name"),
    (set_cell(3, "image_path", "nope/missing.JPEG"), "row 5: image"),
    (lambda f: f.iloc[:0], "train.csv: no rows"),
])
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
    pd.DataFrame({"image_path": ["0.JPEG", "missing.JPEG"]}).to_csv(data_copy / "test.csv", index=False)
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
