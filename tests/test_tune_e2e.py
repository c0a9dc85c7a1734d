"""ray_jobs/tune.py end to end on local Ray with demo data."""

import json
import os
import signal
import subprocess
import tempfile
import time

import pandas as pd
import pytest
from conftest import (
    mlflow_runs,
    own_output,
    run_script,
    started_script,
    wait_for,
    write_space,
)

pytestmark = pytest.mark.e2e  # real commands on local Ray: the fast tier is pytest -m "not e2e"


def test_results_exist_and_agree(finished_search):
    """The quickstart's search (search_spaces/demo.yaml: the start point and 4 trials, 6 epochs at
    most, one at a time, head-only and fine-tuning trials on the shipped pretrained backbone)."""
    folder = finished_search["results"] / "demo"
    trials = pd.read_parquet(folder / "trials.parquet")
    epochs = pd.read_parquet(folder / "epochs.parquet")
    best = json.loads((folder / "best.json").read_text())

    assert len(trials) == 5 and trials["trial_id"].is_unique
    assert {
        "status",
        "epochs_run",
        "best_val_acc",
        "best_epoch",
        "wall_s",
        "gpu_hours",
        "node",
        "error",
        "feature_cache",
        "config.lr",
        "config.freeze",
    } <= set(trials.columns)
    # Head-only trials trained on cached features, the others (last block, or all) their model:
    # both kinds ran, and every branch of the space (TPE's first draws are random, from the seed).
    assert (trials["feature_cache"] == (trials["config.freeze"] == "head")).all()
    assert set(trials["config.freeze"]) == {"head", "last_n_blocks", "none"}, trials[
        "config.freeze"
    ]
    # demo.yaml's lr is conditional on freeze: each trial drew it from its own branch, which
    # search.json keeps for the report.
    search = json.loads((folder / "search.json").read_text())
    ranges = {"head": [3.0e-3, 3.0e-2], "last_n_blocks": [1.0e-3, 1.0e-2], "none": [3.0e-4, 3.0e-3]}
    assert search["params"]["lr"]["branches"] == [
        {"when": {"freeze": ["head"]}, "kind": "loguniform", "args": ranges["head"]},
        {
            "when": {"freeze": ["last_n_blocks"]},
            "kind": "loguniform",
            "args": ranges["last_n_blocks"],
        },
        {"kind": "loguniform", "args": ranges["none"]},
    ]
    for freeze, (low, high) in ranges.items():
        assert trials.loc[trials["config.freeze"] == freeze, "config.lr"].between(low, high).all()
    # The pretrained features: a head on them learns the demo classes from its first epoch.
    head_first_epochs = epochs[(epochs["epoch"] == 1) & (epochs["feature_cache"] == 1)]
    assert (head_first_epochs["val_acc"] > 0.7).all(), head_first_epochs
    assert set(trials["status"]) <= {"finished", "stopped_early"}
    assert (trials["status"] == "stopped_early").any(), "ASHA stopped no trial"
    assert (trials["status"] == "finished").any()
    stopped = trials[trials["status"] == "stopped_early"]
    assert (stopped["epochs_run"] < 6).all()
    assert (trials.loc[trials["status"] == "finished", "epochs_run"] == 6).all()
    workers = (
        epochs["pids"].str.count(",") + 1
    )  # 2 DDP workers per fine-tuning trial, the trial process for a head
    assert (epochs["nodes"].notna() & (workers == 2 - epochs["feature_cache"])).all(), epochs[
        ["pids", "feature_cache"]
    ]

    assert {"trial_id", "epoch", "val_acc", "val_loss", "train_loss", "lr", "images_per_s"} <= set(
        epochs.columns
    )
    assert (
        epochs.groupby("trial_id")["epoch"].max().sort_index()
        == trials.set_index("trial_id")["epochs_run"].sort_index()
    ).all()
    top = epochs.loc[epochs["val_acc"].idxmax()]
    assert (
        best["val_acc"]
        == pytest.approx(top["val_acc"])
        == pytest.approx(trials["best_val_acc"].max())
    )
    assert best["trial_id"] == trials.loc[trials["best_val_acc"].idxmax(), "trial_id"]
    assert best["epoch"] == trials.set_index("trial_id").loc[best["trial_id"], "best_epoch"]
    assert best["config"]["lr"] == trials.set_index("trial_id").loc[best["trial_id"], "config.lr"]
    assert os.path.isdir(best["checkpoint"]) and (folder / "tune").is_dir()
    assert best["val_acc"] > 0.75, "the search learned little"  # 24 classes: chance is 0.04

    # No relative path reached a worker: the data folder and the results are the clone's own.
    assert best["config"]["data_dir"] == str(finished_search["data_dir"])
    assert best["checkpoint"].startswith(str(folder))
    # Wall time per trial: first report minus its epoch time, to the last; max_concurrent 1 under
    # Optuna (Tune limits a Searcher itself) means no two trials overlap.
    last = epochs.sort_values("timestamp").groupby("trial_id").last()
    spans = sorted(
        zip(
            last["timestamp"] - trials.set_index("trial_id").loc[last.index, "wall_s"],
            last["timestamp"],
        )
    )
    assert all(end <= next_start + 1.0 for (_, end), (next_start, _) in zip(spans, spans[1:])), (
        spans
    )
    assert (trials["wall_s"] > 0).all() and (trials["gpu_hours"] == 0).all()


def test_progress_and_summary_are_printed(finished_search):
    output = finished_search["output"]
    folder = finished_search["results"] / "demo"
    best = json.loads((folder / "best.json").read_text())
    trials = pd.read_parquet(folder / "trials.parquet")
    lines = output.splitlines()
    assert any(line.startswith("Ray dashboard: http://127.0.0.1:") for line in lines)
    counts = ", ".join(f"{n} {status}" for status, n in trials["status"].value_counts().items())
    assert f"5 trials: {counts}" in lines
    assert (
        f"best trial {best['trial_id']}: val_acc {best['val_acc']:.4f} at epoch {best['epoch']}"
        in lines
    )
    assert f"  best.json       {folder / 'best.json'}" in lines
    assert f"report: {folder / 'report'}" in lines
    # Readable: a line per epoch and per ended trial, not Ray's own output (tune.py --verbose has
    # that).
    assert len(lines) <= 200, "\n".join(lines)
    assert not any(
        "Reporting training result" in line or "started with configuration" in line
        for line in lines
    )
    assert sum(
        line.startswith("trial ") and " epoch " in line and "/6: val_acc" in line for line in lines
    ) == len(pd.read_parquet(folder / "epochs.parquet"))
    for t in trials.itertuples():
        assert any(
            line.startswith(
                f"trial {t.trial_id} {t.status} after {t.epochs_run} epoch(s): best val_acc "
                f"{t.best_val_acc:.4f} at epoch {t.best_epoch}; "
            )
            for line in lines
        ), t


def test_optuna_dashboard_shows_the_stored_study_live(finished_search):
    """The README's study view on the quickstart's search: optuna-dashboard read the journal in the
    experiment folder while the search ran, and at its end lists every trial with its values."""
    folder = finished_search["results"] / "demo"
    trials = pd.read_parquet(folder / "trials.parquet")
    epochs = pd.read_parquet(folder / "epochs.parquet")
    assert (
        f"Study view: optuna-dashboard {folder / 'study.journal'}"
        in finished_search["output"].splitlines()
    )
    live, final = finished_search["study"]["live"], finished_search["study"]["final"]
    assert (
        1 <= sum(t["state"] == "Complete" for t in live) < len(trials)
    )  # seen while the search went on
    assert len(final) == len(trials) and all(t["state"] == "Complete" for t in final)
    # An Optuna trial's value is its Tune trial's last reported val_acc; its intermediate values are
    # the epochs' before it (Tune hands the last result to the searcher as the trial's completion).
    last_epoch = epochs.sort_values("epoch").groupby("trial_id").last()
    by_lr = {round(float(row["config.lr"]), 12): row["trial_id"] for _, row in trials.iterrows()}
    for study_trial in final:
        params = {p["name"]: p["param_external_value"] for p in study_trial["params"]}
        # demo.yaml's lr has a branch per freeze value: a parameter of its own in the study, each
        # modelled by TPE on the trials that drew it.
        lr_name = {"head": "lr|freeze=head", "last_n_blocks": "lr|freeze=last_n_blocks"}.get(
            params["freeze"], "lr|otherwise"
        )
        assert set(params) == {lr_name, "label_smoothing", "freeze"}
        trial_id = by_lr[round(float(params[lr_name]), 12)]
        assert study_trial["values"][0] == pytest.approx(last_epoch.loc[trial_id, "val_acc"])
        mine = epochs[epochs["trial_id"] == trial_id].sort_values("epoch")
        assert [v["value"] for v in study_trial["intermediate_values"]] == pytest.approx(
            mine["val_acc"].tolist()[:-1]
        )


def test_tensorboard_shows_every_trial(finished_search):
    """The README's TensorBoard command, after the one `pip install -r requirements.txt`."""
    from conftest import local_server

    tune_folder = finished_search["results"] / "demo" / "tune"
    trial_folders = {path.name for path in tune_folder.glob("run_trial_*")}
    with local_server("tensorboard", "--logdir", str(tune_folder), ready="/data/runs") as api:
        # TensorBoard loads the runs in the background after it starts answering.
        runs = wait_for(
            lambda: set(api("/data/runs")) >= trial_folders and api("/data/runs"),
            "every trial's run",
            timeout=60,
        )
        tags = api("/data/plugin/scalars/tags")
    assert len(trial_folders) == 5 and set(runs) >= trial_folders
    assert all("ray/tune/val_acc" in tags[run] for run in trial_folders), tags


def test_existing_experiment_needs_resume(finished_search):
    result = run_script(
        "tune.py", "--space", "search_spaces/demo.yaml", cwd=finished_search["clone"], timeout=120
    )
    assert result.returncode == 2
    assert (
        "experiment already exists; pass --resume" in result.stderr
        and "Traceback" not in result.stderr
    )


def test_infeasible_trial_fails_fast(tmp_path, demo_dir):
    space = write_space(
        tmp_path / "space.yaml", demo_dir, resources={"workers": 4, "gpus_per_worker": 1}
    )
    started = time.monotonic()
    result = run_script(
        "tune.py", "--space", str(space), "--results", str(tmp_path / "results"), timeout=120
    )
    assert time.monotonic() - started < 60
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert (
        "resources: one worker needs 0.9 CPU, 1 GPU, but no node of this cluster has that much"
        in result.stderr
    )
    assert not (tmp_path / "results" / "e2e" / "trials.parquet").exists()


@pytest.mark.parametrize(
    "space_change, args, message",
    [
        (
            {"space": {"lr": {"loguniform": [0.1, 0.001]}}},
            [],
            "space.lr: loguniform: low (0.1) must be below high",
        ),
        ({}, ["--num-samples", "0"], "--num-samples: expected at least 1, got 0"),
        (
            {"data": {"dir": "/nonexistent/sketch"}},
            [],
            "/nonexistent/sketch: data directory not found",
        ),
        ({}, ["--resume"], "no search to resume"),
        (
            {"model": {"name": "test_resnet.r160_in1k", "pretrained": True}},
            [],
            "model test_resnet.r160_in1k: pretrained weights could not be fetched",
        ),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(
    tmp_path, demo_dir, capsys, monkeypatch, space_change, args, message
):
    import huggingface_hub.constants

    from ray_jobs import tune

    monkeypatch.setattr(
        huggingface_hub.constants, "HF_HUB_OFFLINE", True
    )  # weights unreachable, as on CI

    space = write_space(tmp_path / "space.yaml", demo_dir, **space_change)
    assert tune.main(["--space", str(space), "--results", str(tmp_path / "results"), *args]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert not (tmp_path / "results").exists()


def test_ctrl_c_between_two_trials_is_an_interruption(tmp_path):
    """Ray Tune takes Ctrl-C and returns as if the search had ended, even when it comes while no
    trial runs; fit_noting_ctrl_c still tells (tune.py then says 'continue with --resume')."""
    import ray
    from ray import tune

    from ray_jobs.tuning import fit_noting_ctrl_c

    class CtrlCWhenTheFirstTrialEnds(tune.Callback):
        def on_trial_complete(self, iteration, trials, trial, **info):
            if trial is trials[0]:
                os.kill(os.getpid(), signal.SIGINT)  # no trial runs now: the next has not started

    def trainable(config):
        tune.report({"score": config["x"]})

    def tuner(name, callbacks):
        return tune.Tuner(
            trainable,
            param_space={"x": tune.grid_search([1, 2, 3])},
            tune_config=tune.TuneConfig(max_concurrent_trials=1),
            run_config=tune.RunConfig(name=name, storage_path=str(tmp_path), callbacks=callbacks),
        )

    found = signal.getsignal(signal.SIGINT)  # Python's own, or SIG_IGN in a shell's background job
    ray.init(
        num_cpus=1, include_dashboard=False, _temp_dir=tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    )
    try:
        results, interrupted = fit_noting_ctrl_c(
            tuner("interrupted", [CtrlCWhenTheFirstTrialEnds()])
        )
        assert interrupted
        assert sum("score" in (result.metrics or {}) for result in results) < 3
        results, interrupted = fit_noting_ctrl_c(tuner("whole", []))
        assert not interrupted and sorted(result.metrics["score"] for result in results) == [
            1,
            2,
            3,
        ]
    finally:
        ray.shutdown()
    assert signal.getsignal(signal.SIGINT) is found


def test_resume_from_a_bucket_after_the_driver_is_killed_and_after_ctrl_c_with_relative_paths(
    tmp_path, demo_dir, s3
):
    """kill -9, --resume, Ctrl-C, --resume, with the results in a bucket of a real S3 server (Tune's
    state, checkpoints and tables: nothing of the search on the local disk) and the search logged
    to a local MLflow store. Every local path is relative to where the commands run
    (--data-dir, model.checkpoint_file, SKETCH_CACHE_DIR, the MLflow store): Ray Train runs each
    worker in a folder of its own, where such a path would miss. Loader workers and augmentation
    are on, as in the shipped GPU spaces. (A refit with relative paths: test_final_fit.py.)"""
    import timm
    import torch

    (tmp_path / "data").symlink_to(demo_dir)
    (tmp_path / "weights").mkdir()
    torch.save(
        timm.create_model("test_resnet", num_classes=0).state_dict(),
        tmp_path / "weights" / "backbone.pth",
    )
    write_space(
        tmp_path / "space.yaml",
        tmp_path / "unused",
        experiment="stopped",
        num_samples=3,
        max_epochs=2,
        model={"checkpoint_file": "weights/backbone.pth"},
        fixed={"num_workers": 2, "augment": "sketch"},
    )
    results = s3.uri("resumed-searches")
    folder = "resumed-searches/stopped"
    trials_file, epochs_file = f"{folder}/trials.parquet", f"{folder}/epochs.parquet"
    relative = {"cwd": tmp_path, "env": {"SKETCH_CACHE_DIR": "cache"}}
    command = ("tune.py", "--space", "space.yaml", "--data-dir", "data", "--results", results)
    with started_script(
        *command,
        "--mlflow",
        "sqlite:///mlflow.db",
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        **relative,
    ) as driver:
        wait_for(
            lambda: (
                s3.exists(trials_file) and (s3.parquet(trials_file)["epochs_run"] > 0).sum() >= 2
            ),
            "two trials reporting",
            driver,
            timeout=600,
        )
        driver.send_signal(signal.SIGKILL)  # kill -9, a lost SSH session
        driver.wait()
        before_kill, trials_before_kill = s3.parquet(epochs_file), s3.parquet(trials_file)
    # Leaving the block stopped what the killed driver left of its local Ray, which outlives it.

    with started_script(
        *command,
        "--resume",
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **relative,
    ) as driver:
        wait_for(
            lambda: len(s3.parquet(epochs_file)) > len(before_kill),
            "an epoch after --resume",
            driver,
            timeout=600,
        )
        driver.send_signal(signal.SIGINT)  # Ctrl-C: Tune saves the search and stops its trials
        output, _ = driver.communicate(timeout=300)
    assert driver.returncode == 130 and "interrupted; continue with --resume" in output, output[
        -3000:
    ]
    assert "no trial reported" not in output and "Traceback" not in own_output(output), output[
        -3000:
    ]
    assert "interrupted" in set(s3.parquet(trials_file)["status"])
    before_ctrl_c, trials_before_ctrl_c = s3.parquet(epochs_file), s3.parquet(trials_file)

    resumed = run_script(*command, "--resume", cwd=tmp_path, env={**os.environ, **relative["env"]})
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    trials = s3.parquet(trials_file)
    epochs = s3.parquet(epochs_file)
    assert len(trials) == 3 and trials["trial_id"].is_unique
    assert set(trials["status"]) <= {"finished", "stopped_early"}
    for before in (before_kill, before_ctrl_c):
        kept = before.merge(epochs, on=["trial_id", "epoch"], how="left", suffixes=("", "_after"))
        assert kept["val_acc_after"].notna().all(), "rows written before the stop were lost"
    assert (
        epochs.groupby("trial_id")["epoch"].max().sort_index()
        == trials.set_index("trial_id")["epochs_run"].sort_index()
    ).all()
    # Wall time and GPU-hours add up every attempt of a trial: they never decrease, although Tune's
    # own clock (time_total_s) restarts at 0 in a restored trial.
    for before in (trials_before_kill, trials_before_ctrl_c):
        kept = before.merge(trials, on="trial_id", suffixes=("", "_after"))
        assert (kept["wall_s_after"] >= kept["wall_s"]).all() and (
            kept["gpu_hours_after"] >= kept["gpu_hours"]
        ).all()
    resumed_trials = set(before_kill["trial_id"]) & set(
        epochs.loc[epochs["timestamp"] > before_kill["timestamp"].max(), "trial_id"]
    )
    clock = epochs.groupby("trial_id")["time_total_s"].max()
    assert any(
        trials.set_index("trial_id").loc[trial, "wall_s"] > clock[trial] + 1
        for trial in resumed_trials
    ), (trials[["trial_id", "wall_s"]], clock)

    # The relative paths reached the workers as the driver resolved them.
    assert set(trials["config.checkpoint_file"]) == {str(tmp_path / "weights" / "backbone.pth")}
    assert set(trials["config.data_dir"]) == {str(demo_dir.resolve())}
    assert list((tmp_path / "cache").glob("decoded-*.u8")), "the workers did not use ./cache"
    # Everything of the search is in the bucket: Tune's state and the checkpoints it resumed from.
    assert s3.exists(f"{folder}/tune/tuner.pkl") and s3.exists(f"{folder}/best.json")
    checkpoints = epochs["checkpoint_path"].dropna()
    assert len(checkpoints) and checkpoints.str.startswith(f"{results}/stopped/tune/").all()
    assert not (tmp_path / "resumed-searches").exists() and not (tmp_path / "results").exists()

    # One Optuna study went on through both interruptions, restored from the bucket's copy: every
    # trial told to it once, with its result.
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    journal = s3.download(f"{folder}/study.journal", tmp_path / "study.journal")
    study = optuna.load_study(
        study_name="stopped", storage=JournalStorage(JournalFileBackend(str(journal)))
    )
    complete = study.get_trials(states=[optuna.trial.TrialState.COMPLETE])
    assert len(complete) == 3, [(t.number, t.state, t.params) for t in study.trials]
    assert sorted(t.params["lr"] for t in complete) == pytest.approx(sorted(trials["config.lr"]))

    # MLflow: one parent run, one child run per trial through both interruptions, each epoch of
    # the tables logged once.
    import mlflow

    runs = mlflow_runs(f"sqlite:///{tmp_path}/mlflow.db", "stopped")
    children = runs[runs["tags.sketch.kind"] == "trial"].set_index("tags.sketch.trial_id")
    assert (runs["tags.sketch.kind"] == "search").sum() == 1 and len(children) == 3, runs
    assert sorted(children.index) == sorted(trials["trial_id"])
    assert (children["status"] == "FINISHED").all()
    assert (
        children["tags.status"].sort_index() == trials.set_index("trial_id")["status"].sort_index()
    ).all()
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    for trial_id, run in children.iterrows():
        steps = sorted(m.step for m in client.get_metric_history(run["run_id"], "val_acc"))
        assert steps == sorted(epochs.loc[epochs["trial_id"] == trial_id, "epoch"]), trial_id
