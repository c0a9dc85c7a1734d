"""ray_jobs/report.py on results folders written as a search writes them (its own table code, no
Ray), and the report a real demo search leaves behind."""

import io
import re
from dataclasses import dataclass, field

import numpy as np
import pytest
from conftest import run_script
from PIL import Image

from ray_jobs.report import axis_scale, observed_distribution, write_report
from ray_jobs.results import ExperimentTables, ResultsStore, TrialState
from ray_jobs.space import parse_space
from ray_jobs.tune import search_summary

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SMOKE_SEARCHED = ["augment", "head", "label_smoothing", "lr"]


@dataclass
class Trial:
    trial_id: str
    tune_status: str  # what Ray Tune says: TERMINATED, ERROR, RUNNING, PENDING
    val_accs: list[float]
    config: dict = field(default_factory=dict)
    error: str | None = None
    raw_val_accs: list[float] | None = (
        None  # with EMA: the raw weights' (val_accs are the average's)
    )


# The real demo search /tmp/res/smoke2 (3 trials, ASHA stopped two): its configurations and curves.
SMOKE2 = [
    Trial(
        "e5debfc8",
        "TERMINATED",
        [0.048611, 0.076389, 0.111111, 0.090278, 0.208333, 0.201389],
        {"lr": 0.006923530586011298, "label_smoothing": 0.0875174422525385},
    ),
    Trial(
        "aaf421b2",
        "TERMINATED",
        [0.069444, 0.138889, 0.159722, 0.055556],
        {"lr": 0.005483312693790956, "label_smoothing": 0.18511932765853223},
    ),
    Trial(
        "8ddb7e85",
        "TERMINATED",
        [0.041667, 0.048611],
        {"lr": 0.013549145341210668, "label_smoothing": 0.1957236684465528},
    ),
]


def wide_search() -> list[Trial]:
    """Twelve trials over a learning rate spanning three decades, two heads and EMA on or off."""
    rng = np.random.default_rng(0)
    trials = []
    for i in range(12):
        lr = float(10 ** rng.uniform(-5, -2))
        head = ["linear", "mlp"][i % 2]
        accs = list(
            np.linspace(0.1, 0.3 + 0.1 * (head == "mlp") - 0.05 * abs(np.log10(lr) + 3.5), 6)
        )
        trials.append(
            Trial(
                f"w{i:07d}",
                "TERMINATED",
                accs[: 6 if i % 3 == 0 else 2],
                {"lr": lr, "head": head, "ema": bool(i % 4 == 0), "label_smoothing": 0.1},
            )
        )
    return trials


# Distributions the searched values below were drawn from.
DISTRIBUTIONS = {
    "lr": {"loguniform": [1.0e-5, 2.0e-2]},
    "head": {"choice": ["linear", "mlp"]},
    "ema": {"choice": [False, True]},
    "label_smoothing": {"uniform": [0.0, 0.2]},
    "augment": {"choice": ["none", "light", "sketch"]},
    "head_hidden": [{"when": {"head": "mlp"}, "choice": [64, 256]}],
}


def write_search(
    store: ResultsStore,
    trials: list[Trial],
    *,
    searched=SMOKE_SEARCHED,
    max_epochs: int = 6,
    gpus_per_trial: float = 0.0,
    with_best: bool = True,
) -> ResultsStore:
    """search.json, trials.parquet, epochs.parquet and best.json as tune.py and ResultsRecorder
    write them."""
    space = parse_space(
        {
            "experiment": store.experiment,
            "data": {"dir": "/data"},
            "model": {"name": "test_resnet", "image_size": 48},
            "resources": {
                "workers": 2,
                "cpus_per_worker": 0.9,
                "gpus_per_worker": gpus_per_trial / 2,
            },
            "scheduler": {"type": "asha", "max_epochs": max_epochs},
            "space": {name: DISTRIBUTIONS[name] for name in searched},
        },
        source="search_spaces/demo.yaml",
    )
    tables = ExperimentTables(
        metric="val_acc",
        mode="max",
        max_epochs=max_epochs,
        resources=space.resources,
        params=space.params,
        base=space.base,
    )
    for start, trial in enumerate(trials):
        for epoch, val_acc in enumerate(trial.val_accs, start=1):
            tables.add_result(
                trial.trial_id,
                {
                    "epoch": epoch,
                    "val_acc": val_acc,
                    "val_loss": 3.0 - val_acc,
                    "train_loss": 3.2 - 0.1 * epoch,
                    "lr": 0.01 / epoch,
                    "images_per_s": 320.0,
                    "time_total_s": 30.0 + 2.0 * epoch,
                    "time_this_iter_s": 32.0 if epoch == 1 else 2.0,
                    "checkpoint_path": f"/ckpt/{trial.trial_id}/{epoch}",
                    "nodes": "192.0.2.2",
                    "timestamp": 1.7956e9 + 60.0 * start + 2.0 * epoch,
                    **(
                        {"val_acc_ema": val_acc, "val_acc_raw": trial.raw_val_accs[epoch - 1]}
                        if trial.raw_val_accs
                        else {}
                    ),
                },
            )
    base = {**space.base, "augment": "light", "head": "linear"}
    states = [TrialState(t.trial_id, t.tune_status, {**base, **t.config}, t.error) for t in trials]
    trials_frame = tables.trials_frame(states)
    store.write_json("search.json", search_summary(space, [f"n9000000{i}" for i in range(8)]))
    store.write_parquet("epochs.parquet", tables.epochs_frame())
    store.write_parquet("trials.parquet", trials_frame)
    best = tables.best(trials_frame)
    if with_best and best is not None:
        store.write_json("best.json", best)
    return store


def local_search(tmp_path, trials: list[Trial], name: str = "exp", **options) -> ResultsStore:
    return write_search(ResultsStore(str(tmp_path / "results"), name), trials, **options)


def assert_valid_png(data: bytes) -> None:
    assert data[:8] == PNG_SIGNATURE
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        assert image.format == "PNG" and image.width > 100 and image.height > 100


def linked_images(summary: str) -> list[str]:
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", summary)


def read_report(store: ResultsStore) -> tuple[str, list[str]]:
    """summary.md, and the images it links to once each is checked to be a valid PNG."""
    summary = store.read_bytes("report/summary.md").decode()
    images = linked_images(summary)
    for name in images:
        assert_valid_png(store.read_bytes(f"report/{name}"))
    return summary, images


def assert_names_best_trial(summary: str, best: dict) -> None:
    assert f"- trial: `{best['trial_id']}`" in summary
    assert f"- val_acc: {best['val_acc']:.4g} at epoch {best['epoch']}" in summary


@pytest.mark.parametrize(
    "trials, searched, constant",
    [
        (SMOKE2, SMOKE_SEARCHED, ["augment", "head"]),
        (wide_search(), ["ema", "head", "label_smoothing", "lr"], ["label_smoothing"]),
    ],
    ids=["smoke2", "wide"],
)
def test_report_of_a_search_has_every_plot_and_names_the_best_trial(
    tmp_path, trials, searched, constant
):
    store = local_search(tmp_path, trials, searched=searched)
    assert write_report(store) == str(tmp_path / "results" / "exp" / "report")
    summary, images = read_report(store)
    expected = {
        "learning_curves.png",
        "parallel_coordinates.png",
        "importance.png",
        "cost.png",
        *(f"param-{name}.png" for name in searched),
    }
    assert set(images) == expected
    assert sorted(store.list_names("report")) == sorted(expected | {"summary.md"})
    assert_names_best_trial(summary, store.read_json("best.json"))
    assert "- metric: `val_acc` (max)" in summary
    importance = summary.split("## Hyperparameter importance")[1].split("\n## ")[0]
    rows = dict(re.findall(r"^\| (\w+) \| (\d\.\d+) \|$", importance, flags=re.M))
    assert set(rows) == set(searched) - set(constant)
    assert sum(float(value) for value in rows.values()) == pytest.approx(1, abs=1e-3)
    assert f"Constant over these trials, so left out: {', '.join(constant)}." in importance
    assert "GPU-hours: 0 (a CPU-only search" in summary


def test_of_tied_epochs_the_latest_is_the_best_as_ray_keeps_its_checkpoint(tmp_path):
    # Ray's num_to_keep deletes the earlier of equal checkpoints first (test_ray_internals.py).
    store = local_search(
        tmp_path, [Trial("t0000001", "TERMINATED", [0.5, 0.7, 0.6, 0.7, 0.65], {"lr": 0.01})]
    )
    trials = store.read_parquet("trials.parquet")
    assert trials.loc[0, "best_epoch"] == 4
    best = store.read_json("best.json")
    assert (best["epoch"], best["checkpoint"]) == (4, "/ckpt/t0000001/4")


def test_cost_counts_the_epochs_asha_saved(tmp_path):
    store = local_search(tmp_path, SMOKE2, gpus_per_trial=2.0)
    write_report(store)
    summary = store.read_bytes("report/summary.md").decode()
    assert (
        "trial-epochs: 12 run of 18 (3 trials x 6 epochs); ASHA's early stopping saved 6 (33%)"
        in summary
    )
    gpu_hours = store.read_parquet("trials.parquet")["gpu_hours"].sum()
    assert f"- GPU-hours: {gpu_hours:.3f} in all" in summary and "CPU-only" not in summary


def test_epochs_a_budget_cut_are_not_counted_as_asha_s(tmp_path):
    store = local_search(
        tmp_path, SMOKE2 + [Trial("b0000001", "STOPPED_BY_BUDGET", [0.05, 0.07], {"lr": 0.01})]
    )
    assert (
        store.read_parquet("trials.parquet").set_index("trial_id").loc["b0000001", "status"]
        == "stopped_by_budget"
    )
    write_report(store)
    summary = store.read_bytes("report/summary.md").decode()
    assert (
        "trial-epochs: 14 run of 24 (4 trials x 6 epochs); ASHA's early stopping saved 6 (25%)"
        in summary
    )
    assert "- 4 trial-epochs not run for other reasons" in summary


def test_errored_trials_are_listed_and_marked(tmp_path):
    trials = SMOKE2 + [
        Trial("err00001", "ERROR", [], {"lr": 0.02}, "torch.OutOfMemoryError: CUDA out of memory"),
        Trial("err00002", "ERROR", [0.03], {"lr": 0.001}, "ValueError: a | b went wrong"),
    ]
    store = local_search(tmp_path, trials)
    write_report(store)
    summary, images = read_report(store)
    assert "## Errors (2 trials)" in summary
    assert "- `err00001` (error): torch.OutOfMemoryError: CUDA out of memory" in summary
    assert "- `err00002` (error): ValueError: a | b went wrong" in summary
    assert "learning_curves.png" in images and "cost.png" in images
    assert_names_best_trial(summary, store.read_json("best.json"))
    assert (
        "trial-epochs: 13 run of 30" in summary
        and "11 trial-epochs not run for other reasons" in summary
    )


@pytest.mark.parametrize(
    "trials, searched, reason",
    [
        (
            [
                SMOKE2[0],
                Trial("err00001", "ERROR", [], error="RuntimeError: boom"),
                Trial("run00001", "RUNNING", [0.1]),
            ],
            SMOKE_SEARCHED,
            "skipped: 1 trial(s) ended with a val_acc; at least 2 needed.",
        ),
        (SMOKE2, ["lr"], "skipped: 1 searched hyperparameter(s) varied (lr); at least 2 needed."),
        (
            [Trial(t.trial_id, t.tune_status, t.val_accs) for t in SMOKE2],
            SMOKE_SEARCHED,
            "skipped: 0 searched hyperparameter(s) varied (none); at least 2 needed. "
            "Constant over these trials, so left out: augment, head, label_smoothing, lr.",
        ),
        (
            [Trial(t.trial_id, t.tune_status, [0.1] * len(t.val_accs), t.config) for t in SMOKE2],
            SMOKE_SEARCHED,
            "skipped: every trial scored the same val_acc. "
            "Constant over these trials, so left out: augment, head.",
        ),
    ],
    ids=["one-finished-trial", "one-param", "constant-params", "same-score"],
)
def test_importance_is_skipped_with_a_note(tmp_path, trials, searched, reason):
    store = local_search(tmp_path, trials, searched=searched)
    write_report(store)
    summary, images = read_report(store)
    assert f"## Hyperparameter importance\n\n{reason}\n" in summary
    assert "importance.png" not in images and not store.exists("report/importance.png")
    assert_names_best_trial(summary, store.read_json("best.json"))
    assert "learning_curves.png" in images and "parallel_coordinates.png" in images


def test_report_of_a_running_search_without_best_json(tmp_path):
    trials = [
        Trial("run00001", "RUNNING", [0.05, float("nan"), 0.12], {"lr": 0.002}),
        Trial("run00002", "RUNNING", [], {"lr": 0.01}),
        Trial("pend0001", "PENDING", [], {"lr": 0.004}),
    ]
    store = local_search(tmp_path, trials, with_best=False)
    write_report(store)
    summary, images = read_report(store)
    assert "## Best trial\n\nNo trial has reported `val_acc` yet (no best.json)." in summary
    assert "- trials: 3 (2 running, 1 pending)" in summary
    assert {"learning_curves.png", "param-lr.png", "cost.png"} <= set(images)
    assert "trial-epochs: 3 run of 18" in summary


def test_report_of_a_search_with_no_results_yet(tmp_path):
    store = ResultsStore(str(tmp_path / "results"), "fresh")
    write_search(store, [])
    for name in ("trials.parquet", "epochs.parquet"):
        (tmp_path / "results" / "fresh" / name).unlink()
    write_report(store)
    summary, images = read_report(store)
    assert images == []
    assert "No trial has reported `val_acc` yet" in summary
    assert "skipped: 0 trial(s) ended with a val_acc" in summary


def test_report_is_written_through_the_store_on_any_filesystem():
    store = write_search(ResultsStore("mock:///bucket/sketch-hpo", "exp"), SMOKE2)
    assert write_report(store) == "mock://bucket/sketch-hpo/exp/report"
    summary, images = read_report(store)
    assert_names_best_trial(summary, store.read_json("best.json"))
    assert "cost.png" in images


def test_axes_and_distributions_follow_what_the_search_drew_from():
    """search.json's distributions, not the span of the values seen, decide log axes and
    categories."""
    import pandas as pd
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    assert axis_scale([{"kind": "loguniform", "args": [1e-5, 1e-2]}]) == "log"
    assert (
        axis_scale([{"kind": "uniform", "args": [1e-5, 1e-2]}]) == "linear"
    )  # three decades, searched linearly
    assert (
        axis_scale(
            [
                {"kind": "choice", "args": [8, 16]},
                {"when": {"head": ["mlp"]}, "kind": "grid", "args": [32]},
            ]
        )
        == "categories"
    )
    assert (
        axis_scale([{"kind": "choice", "args": [0.0]}, {"kind": "qloguniform", "args": [1, 9, 1]}])
        == "log"
    )
    values = pd.Series([0.0055, 0.0069, 0.0135])
    assert observed_distribution(values, "log") == FloatDistribution(0.0055, 0.0135, log=True)
    assert observed_distribution(values, "linear") == FloatDistribution(0.0055, 0.0135)
    assert observed_distribution(pd.Series([16, 8, 16]), "categories") == CategoricalDistribution(
        [16, 8]
    )
    assert observed_distribution(pd.Series([True, False]), "categories") == CategoricalDistribution(
        [False, True]
    )


def test_cli_writes_the_report_and_says_where(tmp_path, capsys):
    from ray_jobs import report

    local_search(tmp_path, SMOKE2, name="smoke2")
    results = str(tmp_path / "results")
    completed = run_script("report.py", "--results", results, "--name", "smoke2", timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    folder = tmp_path / "results" / "smoke2" / "report"
    assert completed.stdout.strip() == f"report: {folder}"
    assert (folder / "summary.md").is_file() and (folder / "learning_curves.png").is_file()

    # A missing experiment: the command's own error path, run in this process (no second start-up
    # of the command for an error line).
    assert report.main(["--results", results, "--name", "nope"]) == 2
    missing = capsys.readouterr().err
    assert missing.startswith("error: ") and len(missing.strip().splitlines()) == 1
    assert "nope" in missing and "no search.json" in missing
    assert not (tmp_path / "results" / "nope").exists()


def test_search_writes_a_report_naming_the_best_trial(finished_search):
    store = ResultsStore(str(finished_search["results"]), finished_search["experiment"])
    summary, images = read_report(store)
    assert_names_best_trial(summary, store.read_json("best.json"))
    assert {"learning_curves.png", "cost.png", "param-lr.png", "param-freeze.png"} <= set(images)


def test_a_conditional_parameter_is_shown_only_where_a_trial_drew_it(tmp_path):
    """head_hidden is drawn for mlp heads only: the tables leave it empty for linear heads, its plot
    holds the mlp trials alone, and the report's tables mark the others "-"."""
    from ray_jobs.report import Importance, load_results, report_figures

    trials = [
        Trial(
            t.trial_id,
            t.tune_status,
            t.val_accs,
            {**t.config, "head_hidden": 64 + 192 * (i % 3 == 0)},
        )
        for i, t in enumerate(wide_search())
    ]
    store = local_search(tmp_path, trials, searched=["head", "head_hidden", "lr"])
    table = store.read_parquet("trials.parquet")
    mlp = table["config.head"] == "mlp"
    assert (
        table.loc[mlp, "config.head_hidden"].isin([64, 256]).all()
        and table.loc[~mlp, "config.head_hidden"].isna().all()
    )
    write_report(store)
    summary, images = read_report(store)
    assert "param-head_hidden.png" in images
    results = load_results(store)
    slice_plot = report_figures(results, Importance({}, ""), None)["param-head_hidden.png"]
    assert sum(len(points.get_offsets()) for points in slice_plot.axes[0].collections) == mlp.sum()
    top = summary.split("## Top")[1].split("\n## ")[0]
    rows = [line.split(" | ") for line in top.splitlines() if line.startswith("| `")]
    header = [cell.strip("| ") for cell in top.splitlines()[2].split(" | ")]
    column = header.index("head_hidden")
    assert {row[column] for row in rows if "linear" in row} == {"-"}
    assert {row[column] for row in rows if "mlp" in row} <= {"64", "256"}


def test_the_reliability_diagram_measures_calibration():
    from ray_jobs.report import expected_calibration_error, reliability_bins

    rng = np.random.default_rng(0)
    confidence = rng.uniform(0.2, 1.0, 4000)
    right = rng.uniform(size=4000) < confidence  # right as often as confident: calibrated
    probs = np.stack([confidence, 1 - confidence], axis=1)
    targets = np.where(right, 0, 1)
    assert expected_calibration_error(probs, targets) < 0.03
    table = reliability_bins(probs, targets)
    assert (
        table["images"].sum() == 4000
        and (table["accuracy"] - table["confidence"]).abs().max() < 0.06
    )
    overconfident = np.stack(
        [np.full(4000, 0.99), np.full(4000, 0.01)], axis=1
    )  # 99% sure, right ~60%
    assert expected_calibration_error(overconfident, targets) == pytest.approx(
        0.99 - (targets == 0).mean(), abs=1e-9
    )


def test_the_report_shows_what_ema_did_in_the_trials_that_kept_one(tmp_path):
    trials = [
        Trial(
            "ema00001",
            "TERMINATED",
            [0.30, 0.50, 0.60],
            {"ema": True},
            raw_val_accs=[0.40, 0.55, 0.52],
        ),
        Trial(
            "ema00002",
            "TERMINATED",
            [0.20, 0.40, 0.45],
            {"ema": True},
            raw_val_accs=[0.30, 0.50, 0.50],
        ),
        Trial("plain003", "TERMINATED", [0.35, 0.50, 0.58], {"ema": False}),
    ]
    store = local_search(tmp_path, trials, searched=["ema"], max_epochs=3)
    write_report(store)
    section = read_report(store)[0].split("## EMA")[1].split("\n## ")[0]
    assert "2 trial(s) kept an EMA" in section and "plain003" not in section
    rows = {
        line.split(" | ")[0].strip("| `"): line
        for line in section.splitlines()
        if line.startswith("| `")
    }
    assert set(rows) == {"ema00001", "ema00002"}
    assert (
        "| 0.6 | 0.55 | 0.05 |" in rows["ema00001"] and "| 0.45 | 0.5 | -0.05 |" in rows["ema00002"]
    )
