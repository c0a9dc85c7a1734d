"""Results on a real S3-compatible server (moto's, started by the s3_server fixture), reached only
through the standard settings a user exports: AWS_ENDPOINT_URL and the credentials."""

import io
import os
import pickle
from urllib.parse import quote

import mlflow
import optuna
import pytest
import ray
from conftest import free_port, mlflow_runs, run_script, write_space

from ray_jobs.results import ResultsStore
from ray_jobs.study import Study
from ray_jobs.tuning import _searcher


def bad_storage_cases(s3) -> dict[str, tuple[dict[str, str], str, str]]:
    """Each kind of bad storage: the environment it needs, the --results root, the error."""
    return {
        "unreachable endpoint": (
            {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}"},
            s3.uri("bad"),
            f"--results {s3.uri('bad')}: cannot reach the storage (",
        ),
        "missing bucket": ({}, "s3://no-such-bucket/runs", "bucket 'no-such-bucket' not found"),
        "refused credentials": (
            {"AWS_SECRET_ACCESS_KEY": "not-the-secret"},
            s3.uri("bad"),
            f"--results {s3.uri('bad')}: access denied (",
        ),
        "credentials in the URI": (
            {},
            f"s3://{s3.env['AWS_ACCESS_KEY_ID']}:{quote(s3.env['AWS_SECRET_ACCESS_KEY'], safe='')}"
            "@hpo/bad",
            "error: --results: s3://... carries credentials",
        ),
    }


@pytest.mark.parametrize(
    "command, case",
    [
        *(
            ("tune", case)
            for case in (
                "unreachable endpoint",
                "missing bucket",
                "refused credentials",
                "credentials in the URI",
            )
        ),
        # The same store check (an unreachable endpoint costs 6 s of pyarrow's retries each).
        *(
            (command, case)
            for command in ("final_fit", "report")
            for case in ("missing bucket", "refused credentials")
        ),
    ],
)
def test_bad_storage_is_one_line_before_ray_starts_and_writes_nothing(
    s3, demo_dir, tmp_path, monkeypatch, capsys, command, case
):
    import importlib

    env, results, message = bad_storage_cases(s3)[case]
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)
    space = write_space(tmp_path / "space.yaml", demo_dir, experiment="bad")
    args = {
        "tune": ["--space", str(space)],
        "final_fit": ["--best", "--name", "bad"],
        "report": ["--name", "bad"],
    }[command]
    before = s3.keys()
    main = importlib.import_module(f"ray_jobs.{command}").main
    assert main([*args, "--results", results]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert s3.env["AWS_SECRET_ACCESS_KEY"] not in lines[0]
    assert not ray.is_initialized()
    assert s3.keys() == before and sorted(p.name for p in tmp_path.iterdir()) == ["space.yaml"]


def test_the_study_of_a_search_on_object_storage_survives_a_resume(s3, tmp_path, monkeypatch):
    """The searcher's Optuna journal is on the driver's disk; whenever Tune saves the searcher it is
    copied into the experiment folder first, and a resumed search starts from that copy (on
    another machine), or from the driver's own file where that is the same journal further on."""
    from ray_jobs.space import parse_space

    space = parse_space(
        {
            "experiment": "study",
            "data": {"dir": "/data"},
            "model": {"name": "test_resnet"},
            "search": {"searcher": "optuna", "num_samples": 4},
            "space": {"lr": {"loguniform": [1.0e-3, 1.0e-1]}},
        },
        source="study.yaml",
    )
    store = ResultsStore(s3.uri("study-survives"), "study")
    monkeypatch.setenv("SKETCH_CACHE_DIR", str(tmp_path / "driver"))
    searcher, _ = _searcher(space, study=Study(store))
    for trial in ("a", "b"):
        searcher.suggest(trial)
        searcher.on_trial_complete(trial, {"val_acc": 0.5, "training_iteration": 1})
    assert not s3.exists("study-survives/study/study.journal")  # Tune has not saved it yet
    searcher.save(str(tmp_path / "searcher-state.pkl"))  # as Tune does, every ~10 s and at the end
    saved_state = (tmp_path / "searcher-state.pkl").read_bytes()
    assert str(tmp_path).encode() not in saved_state  # nor is the journal's place on this disk
    searcher.suggest("c")  # asked after the save: in the driver's journal only

    def resumed_study(cache_dir: str) -> list:
        """The study a search resumed with SKETCH_CACHE_DIR=cache_dir goes on with."""
        monkeypatch.setenv("SKETCH_CACHE_DIR", str(tmp_path / cache_dir))
        Study(store).prepare_resume()  # tune.py --resume, before Tuner.restore
        restored = pickle.loads(saved_state)  # Tune's searcher-state file
        return restored["_ot_study"].trials

    # Another machine: the copy in the bucket, with every trial the saved searcher knows.
    on_another_machine = resumed_study("elsewhere")
    assert [t.state for t in on_another_machine] == [optuna.trial.TrialState.COMPLETE] * 2
    # The same machine after a kill -9 between two uploads: its own journal, one trial further.
    assert len(resumed_study("driver")) == 3
    # A journal this disk kept of an earlier experiment of the same name is not that one.
    monkeypatch.setenv("SKETCH_CACHE_DIR", str(tmp_path / "elsewhere"))
    Study(store).start_new()
    searcher, _ = _searcher(space, study=Study(store))
    searcher.suggest("x")
    assert len(resumed_study("elsewhere")) == 2


@pytest.fixture(scope="module")
def bucket_search(tmp_path_factory, demo_dir, s3_server):
    """The README's S3 command on the demo data: a search of head-only and fine-tuning trials
    with its results in the bucket (--results s3://hpo/team), logged to a local MLflow store
    through MLFLOW_TRACKING_URI, as a user exports it; then `final_fit.py --best` of it, with the
    tracking variable unset (the refit is logged where its search was)."""
    folder = tmp_path_factory.mktemp("team")
    space = write_space(
        folder / "space.yaml",
        demo_dir,
        experiment="mixed",
        num_samples=1,
        max_epochs=2,
        search={"start_from": [{"freeze": "head", "lr": 1.0e-2}, {"freeze": "none", "lr": 5.0e-3}]},
        space={"freeze": {"choice": ["head", "none"]}, "lr": {"loguniform": [1.0e-3, 2.0e-2]}},
    )
    results, tracking = s3_server.uri("team"), f"sqlite:///{folder}/mlflow.db"
    environment = {**os.environ, **s3_server.env}
    search = run_script(
        "tune.py",
        "--space",
        str(space),
        "--results",
        results,
        cwd=folder,
        env={**environment, "MLFLOW_TRACKING_URI": tracking},
    )
    assert search.returncode == 0, search.stdout[-3000:] + search.stderr[-3000:]
    refit = run_script("final_fit.py", "--best", "--results", results, cwd=folder, env=environment)
    assert refit.returncode == 0, refit.stdout[-3000:] + refit.stderr[-3000:]
    return {
        "folder": folder,
        "results": results,
        "tracking": tracking,
        "output": search.stdout,
        "refit_output": refit.stdout,
    }


@pytest.mark.e2e
def test_a_search_keeps_its_results_in_the_bucket_and_its_runs_in_mlflow(bucket_search, s3):
    results, output = bucket_search["results"], bucket_search["output"]
    trials = s3.parquet("team/mixed/trials.parquet")
    epochs = s3.parquet("team/mixed/epochs.parquet")
    best = s3.json("team/mixed/best.json")
    search = s3.json("team/mixed/search.json")
    assert len(trials) == 3 and set(trials["feature_cache"]) == {0, 1}  # both kinds of trial
    assert set(trials["status"]) <= {"finished", "stopped_early"}
    # Tune's state, the study and the checkpoints are the bucket's; nothing is on the local disk.
    keys = s3.keys("team/mixed/")
    assert {"team/mixed/tune/tuner.pkl", "team/mixed/study.journal"} <= set(keys)
    assert any(key.startswith("team/mixed/tune/experiment_state-") for key in keys)
    assert best["checkpoint"].startswith(f"{results}/mixed/tune/") and s3.keys(
        best["checkpoint"].removeprefix(s3.uri() + "/")
    )
    assert sorted(p.name for p in bucket_search["folder"].iterdir()) == [
        "mlartifacts",
        "mlflow.db",
        "space.yaml",
    ]
    for name in ("trials.parquet", "best.json", "tune"):
        assert f"  {name:15s} {results}/mixed/{name}" in output.splitlines()

    # MLflow: the search a parent run, each trial a child with its searched values, every epoch's
    # metrics at step=epoch, its status and GPU-hours; the report on the parent.
    assert search["mlflow"]["tracking_uri"] == bucket_search["tracking"]
    runs = mlflow_runs(bucket_search["tracking"], "mixed")
    parent = runs[runs["tags.sketch.kind"] == "search"]
    assert len(parent) == 1 and parent["run_id"].iloc[0] == search["mlflow"]["run_id"]
    assert f"MLflow: run {search['mlflow']['run_id']} in {bucket_search['tracking']}" in output
    children = runs[runs["tags.mlflow.parentRunId"] == search["mlflow"]["run_id"]]
    children = children[children["tags.sketch.kind"] == "trial"].set_index("tags.sketch.trial_id")
    table = trials.set_index("trial_id")
    assert sorted(children.index) == sorted(table.index)
    assert (children["params.freeze"] == table.loc[children.index, "config.freeze"]).all()
    assert children["params.lr"].astype(float).tolist() == pytest.approx(
        table.loc[children.index, "config.lr"].tolist()
    )
    assert (children["tags.status"] == table.loc[children.index, "status"]).all()
    assert (children["tags.gpu_hours"].astype(float) == 0).all()  # CPU only
    client = mlflow.MlflowClient(bucket_search["tracking"])
    for trial_id, run in children.iterrows():
        mine = epochs[epochs["trial_id"] == trial_id].sort_values("epoch")
        for metric in ("val_acc", "train_loss", "images_per_s"):
            history = sorted(
                (m.step, m.value) for m in client.get_metric_history(run["run_id"], metric)
            )
            assert [step for step, _ in history] == mine["epoch"].tolist(), (trial_id, metric)
            assert [value for _, value in history] == pytest.approx(mine[metric].tolist())
    assert parent["metrics.best_val_acc"].iloc[0] == pytest.approx(best["val_acc"])
    artifacts = {a.path for a in client.list_artifacts(search["mlflow"]["run_id"], "report")}
    assert {"report/summary.md", "report/learning_curves.png"} <= artifacts


@pytest.mark.e2e
def test_the_refit_of_a_bucket_search_writes_its_submission_there(bucket_search, s3, demo_dir):
    import pandas as pd

    from sketch_core.demo_data import known_answers

    results = bucket_search["results"]
    best = s3.json("team/mixed/best.json")
    fits = [key for key in s3.keys("team/mixed/final/") if key.endswith("/fit.json")]
    assert len(fits) == 1
    fit = s3.json(fits[0])
    assert fit["models"][0]["source_trial"] == best["trial_id"]
    assert fit["submission"] == f"{results}/mixed/final/submission.csv"
    submission = pd.read_csv(io.BytesIO(s3.read("team/mixed/final/submission.csv")))
    test = pd.read_csv(demo_dir / "test.csv")
    assert submission["image_path"].tolist() == test["image_path"].tolist()
    accuracy = (submission["target"] == known_answers(demo_dir, submission["image_path"])).mean()
    assert accuracy == pytest.approx(fit["test_accuracy"]["ensemble"]) and accuracy > 2 / 8
    assert f"submission: {results}/mixed/final/submission.csv" in bucket_search["refit_output"]

    # Logged as a run under the search's, with its submission and fit.json.
    search = s3.json("team/mixed/search.json")
    runs = mlflow_runs(bucket_search["tracking"], "mixed")
    refit = runs[runs["tags.sketch.kind"] == "refit"]
    assert len(refit) == 1 and refit["status"].iloc[0] == "FINISHED"
    assert refit["tags.mlflow.parentRunId"].iloc[0] == search["mlflow"]["run_id"]
    assert refit["params.source_trials"].iloc[0] == best["trial_id"]
    assert refit["metrics.test_accuracy/ensemble"].iloc[0] == pytest.approx(accuracy)
    client = mlflow.MlflowClient(bucket_search["tracking"])
    logged = {a.path: a for a in client.list_artifacts(refit["run_id"].iloc[0])}
    assert set(logged) == {"submission.csv", "fit.json"}
    downloaded = client.download_artifacts(refit["run_id"].iloc[0], "submission.csv")
    assert pd.read_csv(downloaded).equals(submission)
