import subprocess
import sys
from pathlib import Path

import cv2
import pandas as pd
import pytest

from sketch_core import demo_data
from sketch_core.demo_data import MAX_CLASSES, class_name, generate

REPO_ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(classes=4, images_per_class=3, test_images=5, min_size=32, max_size=64, seed=7)


@pytest.fixture(scope="module")
def small_set(tmp_path_factory) -> Path:
    return generate(tmp_path_factory.mktemp("small") / "data", **SMALL)


def listed_images(root: Path) -> list[Path]:
    train = pd.read_csv(root / "train.csv")
    test = pd.read_csv(root / "test.csv")
    return ([root / "train" / p for p in train.image_path]
            + [root / "test" / p for p in test.image_path])


def all_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_and_columns_match_the_contract(small_set):
    assert sorted(p.name for p in small_set.iterdir()) == [
        "test", "test.csv", "test_answers.csv", "train", "train.csv"]
    train = pd.read_csv(small_set / "train.csv")
    test = pd.read_csv(small_set / "test.csv")
    answers = pd.read_csv(small_set / "test_answers.csv")
    assert list(train.columns) == ["class_name", "image_path", "target"]
    assert list(test.columns) == ["image_path"]
    assert list(answers.columns) == ["image_path", "target"]
    assert len(train) == SMALL["classes"] * SMALL["images_per_class"]
    assert len(test) == SMALL["test_images"]

    assert train.image_path.str.fullmatch(r"n\d{8}/sketch_\d+\.JPEG").all()
    assert (train.image_path.str.split("/").str[0] == train.class_name).all()
    assert test.image_path.tolist() == [f"{k}.JPEG" for k in range(SMALL["test_images"])]
    assert sorted(p.name for p in (small_set / "train").iterdir()) == sorted(train.class_name.unique())
    assert len(list((small_set / "test").iterdir())) == SMALL["test_images"]
    assert not list(small_set.parent.glob(".*partial*"))


def test_targets_cover_all_classes_and_match_class_names(small_set):
    train = pd.read_csv(small_set / "train.csv")
    assert sorted(train.target.unique()) == list(range(SMALL["classes"]))
    assert train.groupby("class_name").target.nunique().eq(1).all()
    assert train.groupby("target").class_name.nunique().eq(1).all()
    assert (train.class_name == train.target.map(class_name)).all()
    assert train.target.value_counts().eq(SMALL["images_per_class"]).all()


def test_test_answers_align_with_test_csv(small_set):
    test = pd.read_csv(small_set / "test.csv")
    answers = pd.read_csv(small_set / "test_answers.csv")
    assert answers.image_path.tolist() == test.image_path.tolist()
    assert answers.target.between(0, SMALL["classes"] - 1).all()
    counts = answers.target.value_counts()
    assert counts.max() - counts.min() <= 1


def test_every_listed_image_decodes_within_size_bounds(small_set):
    for path in listed_images(small_set):
        image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        assert image is not None, path
        height, width = image.shape[:2]
        assert SMALL["min_size"] <= height <= SMALL["max_size"]
        assert SMALL["min_size"] <= width <= SMALL["max_size"]


def test_images_mix_grayscale_and_colour_jpegs(small_set):
    channels = []
    for path in listed_images(small_set):
        image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        channels.append(1 if image.ndim == 2 else image.shape[2])
    assert set(channels) == {1, 3}
    assert 0.1 <= channels.count(1) / len(channels) <= 0.4


def test_images_look_like_dark_lines_on_white_paper(tmp_path):
    root = generate(tmp_path / "data", classes=4, images_per_class=3, test_images=5,
                    min_size=150, max_size=300, seed=1)
    means = []
    for path in listed_images(root):
        image = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
        means.append(image.mean())
        assert image.min() < 120, f"{path} has no dark strokes"
    assert 180 < min(means) and max(means) < 255


def test_same_seed_gives_byte_identical_data_and_other_seed_differs(tmp_path, small_set):
    again = generate(tmp_path / "again", **SMALL)
    assert all_files(again) == all_files(small_set)

    other = generate(tmp_path / "other", **{**SMALL, "seed": SMALL["seed"] + 1})
    assert all_files(other) != all_files(small_set)


def test_refuses_to_overwrite_non_empty_directory(tmp_path):
    existing = tmp_path / "data"
    existing.mkdir()
    (existing / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="already exists"):
        generate(existing, **SMALL)
    assert [p.name for p in existing.iterdir()] == ["keep.txt"]
    assert (existing / "keep.txt").read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_losing_a_race_keeps_the_winners_data_and_cleans_up(tmp_path, monkeypatch):
    target = tmp_path / "data"
    write_dataset = demo_data._write_dataset

    def winner_finishes_first(root, *args):
        write_dataset(root, *args)
        target.mkdir()
        (target / "train.csv").write_text("winner")

    monkeypatch.setattr(demo_data, "_write_dataset", winner_finishes_first)
    with pytest.raises(FileExistsError, match="already exists"):
        generate(target, **SMALL)
    assert (target / "train.csv").read_text() == "winner"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_interrupted_run_leaves_nothing_behind(tmp_path, monkeypatch):
    written = []

    def interrupt_after_two_images(path, *args):
        if len(written) == 2:
            raise KeyboardInterrupt
        written.append(path)

    monkeypatch.setattr(demo_data, "_write_image", interrupt_after_two_images)
    with pytest.raises(KeyboardInterrupt):
        generate(tmp_path / "data", **SMALL)
    assert list(tmp_path.iterdir()) == []


def test_fills_an_existing_empty_directory(tmp_path):
    (tmp_path / "data").mkdir()
    root = generate(tmp_path / "data", **SMALL)
    assert (root / "train.csv").is_file()


@pytest.mark.parametrize("bad", [
    dict(classes=1), dict(classes=MAX_CLASSES + 1), dict(images_per_class=1),
    dict(test_images=0), dict(min_size=15, max_size=64), dict(min_size=65, max_size=64),
    dict(seed=-1),
])
def test_rejects_out_of_range_arguments_without_writing(tmp_path, bad):
    with pytest.raises(ValueError):
        generate(tmp_path / "data", **{**SMALL, **bad})
    assert list(tmp_path.iterdir()) == []


def test_supports_many_distinct_classes():
    assert MAX_CLASSES >= 48


def run_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sketch_core.demo_data", *map(str, args)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)


def test_cli_writes_data_set_and_reports_one_line(tmp_path):
    result = run_cli(tmp_path / "data", "--classes", 3, "--images-per-class", 2, "--test-images", 2,
                     "--min-size", 32, "--max-size", 48, "--seed", 3)
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.strip().splitlines()) == 1
    assert str(tmp_path / "data") in result.stdout
    assert len(pd.read_csv(tmp_path / "data" / "train.csv")) == 6


def assert_one_line_usage_error(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("args", [
    ["--classes", "1"],
    [f"--classes={MAX_CLASSES + 1}"],
    ["--min-size", "100", "--max-size", "50"],
    ["--classes", "many"],
])
def test_cli_bad_arguments_print_one_error_line_and_exit_2(tmp_path, args):
    assert_one_line_usage_error(run_cli(tmp_path / "data", *args))
    assert list(tmp_path.iterdir()) == []


def test_cli_existing_non_empty_directory_is_an_error(tmp_path):
    (tmp_path / "keep.txt").write_text("x")
    result = run_cli(tmp_path)
    assert_one_line_usage_error(result)
    assert str(tmp_path) in result.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]
