import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from sketch_core import demo_data
from sketch_core.demo_data import COPY_KINDS, MAX_CLASSES, class_name, generate

REPO_ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(classes=4, images_per_class=3, test_images=5, min_size=32, max_size=64, seed=7)
# Half of 24 originals get a copy: 3 of each kind.
PLANTED = dict(SMALL, images_per_class=6, duplicates=0.5)


@pytest.fixture(scope="module")
def small_set(tmp_path_factory) -> Path:
    return generate(tmp_path_factory.mktemp("small") / "data", **SMALL)


@pytest.fixture(scope="module")
def planted_set(tmp_path_factory) -> Path:
    return generate(tmp_path_factory.mktemp("planted") / "data", **PLANTED)


def listed_images(root: Path) -> list[Path]:
    train = pd.read_csv(root / "train.csv")
    test = pd.read_csv(root / "test.csv")
    return [root / "train" / p for p in train.image_path] + [
        root / "test" / p for p in test.image_path
    ]


def all_files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_layout_and_columns_match_the_contract(small_set):
    assert sorted(p.name for p in small_set.iterdir()) == [
        "test",
        "test.csv",
        "test_answers.csv",
        "train",
        "train.csv",
    ]
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
    assert sorted(p.name for p in (small_set / "train").iterdir()) == sorted(
        train.class_name.unique()
    )
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
    # known_answers: the answers of any test images, in the order asked; none for real data
    shuffled = test.image_path.sample(frac=1, random_state=0)
    assert (
        demo_data.known_answers(small_set, shuffled).tolist()
        == answers.set_index("image_path").target.loc[shuffled].tolist()
    )
    assert demo_data.known_answers(small_set / "train", shuffled) is None


@pytest.mark.parametrize("data_set", ["small_set", "planted_set"])
def test_every_listed_image_decodes_within_size_bounds(data_set, request):
    for path in listed_images(request.getfixturevalue(data_set)):
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
    root = generate(
        tmp_path / "data",
        classes=4,
        images_per_class=3,
        test_images=5,
        min_size=150,
        max_size=300,
        seed=1,
    )
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


def test_planted_duplicates_are_extra_rows_of_their_class_listed_with_their_originals(planted_set):
    train = pd.read_csv(planted_set / "train.csv")
    pairs = pd.read_csv(planted_set / "duplicates.csv")
    originals = PLANTED["classes"] * PLANTED["images_per_class"]
    assert list(pairs.columns) == ["image_path", "original", "kind"]
    assert len(pairs) == originals // 2 and len(train) == originals + len(pairs)
    assert pairs.kind.value_counts().to_dict() == {kind: 3 for kind in COPY_KINDS}
    assert (
        train.image_path.is_unique
        and train.image_path.str.fullmatch(r"n\d{8}/sketch_\d+\.JPEG").all()
    )
    target_of = dict(zip(train.image_path, train.target))
    assert (pairs.image_path.map(target_of) == pairs.original.map(target_of)).all()
    assert pairs.original.is_unique and not set(pairs.original) & set(pairs.image_path)
    assert (
        pairs.original.str.extract(r"sketch_(\d+)")[0].astype(int) < PLANTED["images_per_class"]
    ).all()


def copy_errors(root: Path, copy: str, original: str) -> dict[str, float]:
    """Mean absolute difference (grey levels) between a copy and the closest transform of its
    original of each kind (inf where none has the copy's shape)."""
    copied, source = (
        cv2.imread(str(root / "train" / p), cv2.IMREAD_GRAYSCALE).astype(np.float32)
        for p in (copy, original)
    )
    height, width = source.shape

    def small_rotation(sign, degrees):
        rotation = cv2.getRotationMatrix2D((width / 2, height / 2), sign * degrees, 1.0)
        return cv2.warpAffine(
            source, rotation, (width, height), borderMode=cv2.BORDER_CONSTANT, borderValue=255
        )

    transforms = {
        "mirror": [cv2.flip(source, 1)],
        "quarter_turn": [
            cv2.rotate(source, turn)
            for turn in (cv2.ROTATE_90_CLOCKWISE, cv2.ROTATE_180, cv2.ROTATE_90_COUNTERCLOCKWISE)
        ],
        "small_rotation": [
            small_rotation(sign, degrees)
            for sign in (-1, 1)
            for degrees in np.arange(5, 10.01, 0.25)
        ],
        "reencode": [cv2.resize(source, copied.shape[::-1], interpolation=cv2.INTER_AREA)],
    }
    return {
        kind: min(
            (np.abs(image - copied).mean() for image in images if image.shape == copied.shape),
            default=np.inf,
        )
        for kind, images in transforms.items()
    }


def test_each_planted_copy_is_the_transform_its_kind_names(planted_set):
    for row in pd.read_csv(planted_set / "duplicates.csv").itertuples():
        errors = copy_errors(planted_set, row.image_path, row.original)
        assert errors[row.kind] < 4 and min(errors, key=errors.get) == row.kind, (row, errors)


def test_planting_only_adds_files_and_is_deterministic(tmp_path, planted_set):
    without = all_files(generate(tmp_path / "without", **{**PLANTED, "duplicates": 0.0}))
    planted = all_files(planted_set)
    copies = {f"train/{path}" for path in pd.read_csv(planted_set / "duplicates.csv").image_path}
    assert set(planted) - set(without) == copies | {"duplicates.csv"}
    assert all(planted[name] == data for name, data in without.items() if name != "train.csv")
    assert all_files(generate(tmp_path / "again", **PLANTED)) == planted


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


@pytest.mark.parametrize(
    "bad",
    [
        dict(classes=1),
        dict(classes=MAX_CLASSES + 1),
        dict(images_per_class=1),
        dict(test_images=0),
        dict(min_size=15, max_size=64),
        dict(min_size=65, max_size=64),
        dict(seed=-1),
        dict(duplicates=-0.1),
        dict(duplicates=1.5),
    ],
)
def test_rejects_out_of_range_arguments_without_writing(tmp_path, bad):
    with pytest.raises(ValueError):
        generate(tmp_path / "data", **{**SMALL, **bad})
    assert list(tmp_path.iterdir()) == []


def test_supports_many_distinct_classes():
    assert MAX_CLASSES >= 48


def run_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sketch_core.demo_data", *map(str, args)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_cli_writes_data_set_and_reports_one_line(tmp_path):
    result = run_cli(
        tmp_path / "data",
        "--classes",
        3,
        "--images-per-class",
        2,
        "--test-images",
        2,
        "--min-size",
        32,
        "--max-size",
        48,
        "--seed",
        3,
    )
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.strip().splitlines()) == 1
    assert str(tmp_path / "data") in result.stdout
    assert len(pd.read_csv(tmp_path / "data" / "train.csv")) == 6


def test_cli_plants_duplicates_and_counts_them(tmp_path):
    result = run_cli(
        tmp_path / "data",
        "--classes",
        3,
        "--images-per-class",
        4,
        "--test-images",
        2,
        "--min-size",
        32,
        "--max-size",
        48,
        "--duplicates",
        0.5,
    )
    assert result.returncode == 0, result.stderr
    assert "wrote 18 train (6 of them planted near-duplicates)" in result.stdout
    assert len(pd.read_csv(tmp_path / "data" / "duplicates.csv")) == 6


def assert_one_line_usage_error(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["--classes", "1"],
        [f"--classes={MAX_CLASSES + 1}"],
        ["--min-size", "100", "--max-size", "50"],
        ["--classes", "many"],
        ["--duplicates", "1.5"],
    ],
)
def test_cli_bad_arguments_print_one_error_line_and_exit_2(tmp_path, args):
    assert_one_line_usage_error(run_cli(tmp_path / "data", *args))
    assert list(tmp_path.iterdir()) == []


def test_cli_existing_non_empty_directory_is_an_error(tmp_path):
    (tmp_path / "keep.txt").write_text("x")
    result = run_cli(tmp_path)
    assert_one_line_usage_error(result)
    assert str(tmp_path) in result.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]
