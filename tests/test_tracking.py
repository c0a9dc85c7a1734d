"""MLflow tracking (ray_jobs/tracking.py) against a real local tracking store: the runs are read
back with mlflow.search_runs, as a user or a dashboard reads them."""

import pickle
from types import SimpleNamespace

import mlflow
import pytest
from conftest import mlflow_runs
from mlflow.entities import ViewType

from ray_jobs.results import ExperimentTables, ResultsRecorder, ResultsStore
from ray_jobs.space import parse_space
from ray_jobs.tracking import SearchRuns, tracking_uri
from ray_jobs.tune import search_summary
from sketch_core.errors import SketchError


def test_where_the_runs_go(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking_uri(None, "results") is None  # no --mlflow, no MLFLOW_TRACKING_URI: none
    # --mlflow alone: a SQLite store beside the results, which `mlflow ui` opens.
    assert tracking_uri("", "results") == f"sqlite:///{tmp_path}/results/mlflow.db"
    assert tracking_uri("sqlite:///runs.db", "results") == f"sqlite:///{tmp_path}/runs.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking_uri(None, "results") == tracking_uri("", "results") == "http://127.0.0.1:5000"
    assert tracking_uri("http://mlflow.internal", "s3://hpo/runs") == "http://mlflow.internal"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    with pytest.raises(SketchError, match="results on object storage .* have no folder"):
        tracking_uri("", "s3://hpo/runs")
    with pytest.raises(SketchError, match="carries credentials.*MLFLOW_TRACKING_USERNAME"):
        tracking_uri("https://me:secret@mlflow.internal", "results")


def test_a_search_is_a_parent_run_with_a_run_per_trial_and_a_resume_adds_to_them(tmp_path):
    """ResultsRecorder keeps the runs in step with the tables; the recorder Tune restores on
    --resume (unpickled from its saved state) goes on with the same runs: no trial gets a second
    run, no epoch is logged twice."""
    space = parse_space(
        {
            "experiment": "tracked",
            "data": {"dir": "/data"},
            "model": {"name": "test_resnet"},
            "resources": {"workers": 1, "gpus_per_worker": 1},
            "scheduler": {"type": "asha", "max_epochs": 3},
            "space": {
                "head": {"choice": ["linear", "mlp"]},
                "head_hidden": [{"when": {"head": "mlp"}, "choice": [32, 64]}],
                "lr": {"loguniform": [1.0e-3, 1.0e-1]},
            },
        },
        source="tracked.yaml",
    )
    store = ResultsStore(str(tmp_path / "results"), "tracked")
    uri = tracking_uri("", store.root)
    summary = search_summary(space, ["a", "b"])
    tracking = SearchRuns(uri, "tracked", summary)
    tracking.check()
    summary["mlflow"] = tracking.start_search(summary, store.uri())
    store.write_json("search.json", summary)

    def recorder():
        tables = ExperimentTables(
            metric="val_acc",
            mode="max",
            max_epochs=3,
            resources=space.resources,
            params=space.params,
            base=space.base,
        )
        return ResultsRecorder(store, tables, tracking)

    trials = [
        SimpleNamespace(
            trial_id="mlp", status="RUNNING", config={**space.base, "head": "mlp", "lr": 0.01}
        ),
        SimpleNamespace(
            trial_id="linear", status="RUNNING", config={**space.base, "head": "linear"}
        ),
    ]
    trials[0].config["head_hidden"] = 64
    trials[1].config["lr"] = 0.05
    # Drawn just before the kill, so missing from the state Tune saved: gone after --resume.
    lost = SimpleNamespace(
        trial_id="lost", status="PENDING", config={**space.base, "head": "linear"}
    )

    def report(callback, trial, epoch):
        result = {"epoch": epoch, "val_acc": 0.1 * epoch + len(trial.trial_id) / 100}
        result.update(val_loss=2.0 - result["val_acc"], lr=0.01, time_this_iter_s=36.0)
        callback.on_trial_result(0, trials, trial, result)

    first = recorder()
    first.setup()
    saved = pickle.dumps(first)  # Tune saves the callbacks with its state when the search starts
    for epoch in (1, 2):
        report(first, trials[0], epoch)
        report(first, trials[1], epoch)
    first.write([*trials, lost])
    first.on_trial_complete(0, trials, trials[0])  # its last result came with epoch 2... (ASHA)
    trials[0].status = "TERMINATED"
    # kill -9 here; --resume restores the recorder pickled above and re-reports linear's epoch 2
    resumed = pickle.loads(saved)
    resumed.setup()
    for epoch in (2, 3):
        report(resumed, trials[1], epoch)
    resumed.on_trial_complete(0, trials, trials[1])
    trials[1].status = "TERMINATED"
    resumed.on_experiment_end(trials)
    SearchRuns(uri, "tracked", summary, run_id=tracking.run_id).finish(store, interrupted=False)

    runs = mlflow_runs(uri, "tracked")
    assert len(runs) == 3, runs[["tags.mlflow.runName", "tags.sketch.kind"]]
    trashed = mlflow.MlflowClient(uri).search_runs(
        [runs["experiment_id"].iloc[0]], run_view_type=ViewType.DELETED_ONLY
    )
    assert [run.data.tags["sketch.trial_id"] for run in trashed] == ["lost"]
    parent = runs[runs["tags.sketch.kind"] == "search"].iloc[0]
    children = runs[runs["tags.mlflow.parentRunId"] == parent["run_id"]].set_index(
        "tags.sketch.trial_id"
    )
    assert parent["run_id"] == tracking.run_id and parent["status"] == "FINISHED"
    assert parent["params.searched"] == "head,head_hidden,lr"
    assert parent["tags.sketch.results"] == store.uri()
    table = store.read_parquet("trials.parquet").set_index("trial_id")
    epochs = store.read_parquet("epochs.parquet")
    best = store.read_json("best.json")
    assert parent["metrics.best_val_acc"] == pytest.approx(best["val_acc"])
    assert parent["tags.best_trial"] == best["trial_id"] == "linear"
    # The searched values as params: head_hidden only where the trial drew it.
    assert children.loc["mlp", ["params.head", "params.head_hidden", "params.lr"]].tolist() == [
        "mlp",
        "64",
        "0.01",
    ]
    assert children.loc["linear", "params.head"] == "linear"
    assert children.loc["linear", "params.lr"] == "0.05"
    assert children["params.head_hidden"].isna()["linear"]
    client = mlflow.MlflowClient(uri)
    for trial_id, run in children.iterrows():
        assert run["tags.status"] == table.loc[trial_id, "status"]
        assert float(run["tags.gpu_hours"]) == pytest.approx(table.loc[trial_id, "gpu_hours"])
        assert run["status"] == "FINISHED"
        mine = epochs[epochs["trial_id"] == trial_id]
        for metric in ("val_acc", "val_loss"):
            history = sorted(
                (m.step, m.value) for m in client.get_metric_history(run["run_id"], metric)
            )
            assert [step for step, _ in history] == mine["epoch"].tolist()  # each epoch once
            assert [value for _, value in history] == pytest.approx(mine[metric].tolist())
    assert (table["gpu_hours"] > 0).all()
    artifacts = {a.path for a in client.list_artifacts(tracking.run_id)}
    assert {"search.json", "best.json"} <= artifacts
    assert (tmp_path / "results" / "mlartifacts").is_dir()  # beside the store, not where it ran
