"""tune.py, final_fit.py and report.py on the demo data, as a user runs them, with the results in a
bucket of a real S3 server: a head-only search with a conditional parameter; a second search
warm-starts from its trials and is ended by its GPU-hour budget; the first one's top
configurations are refitted on folds and combined by greedy selection out of fold."""

import io
import os
import time

import numpy as np
import optuna
import pandas as pd
import pytest
import yaml
from conftest import run_script, write_space

pytestmark = pytest.mark.e2e  # real commands on local Ray: the fast tier is pytest -m "not e2e"

HEAD_TRIALS = 10  # all drawn at random (TPE's startup_trials), from the seed
# The warm-started search runs its head-only trials on a node that declares a GPU, each holding
# HEAD_GPUS of it, and the first epoch any of them reports spends its GPU-hour budget, however
# fast or slow the machine: the budget counts the reported epochs' time times the GPUs held.
HEAD_GPUS = 0.5
GPU_BUDGET = 1.0e-9


def test_trials_a_budget_stopped_are_told_apart_from_asha_s_stops_and_stay_so_on_resume(tmp_path):
    """Tune's stop_all ends running and pending trials as TERMINATED without on_trial_complete,
    which is what an ASHA stop or a last epoch goes through."""
    from types import SimpleNamespace

    from ray_jobs.results import ExperimentTables, ResultsRecorder, ResultsStore
    from ray_jobs.space import parse_space

    space = parse_space(
        {
            "experiment": "b",
            "data": {"dir": "/data"},
            "model": {"name": "test_resnet"},
            "scheduler": {"type": "asha", "max_epochs": 4},
            "space": {"lr": {"loguniform": [1.0e-3, 1.0e-1]}},
        },
        source="b.yaml",
    )

    def recorder():
        tables = ExperimentTables(
            metric="val_acc",
            mode="max",
            max_epochs=4,
            resources=space.resources,
            params=space.params,
            base=space.base,
        )
        callback = ResultsRecorder(ResultsStore(str(tmp_path / "results"), "b"), tables)
        callback.setup()
        return callback

    first = recorder()
    trials = [
        SimpleNamespace(trial_id=name, status="RUNNING", config={**space.base, "lr": 0.01})
        for name in "abcde"
    ]
    for trial, epochs in zip(trials, (4, 2, 1, 0, 4)):
        for epoch in range(1, epochs + 1):
            first.on_trial_result(
                0, trials, trial, {"epoch": epoch, "val_acc": 0.1 * epoch, "time_this_iter_s": 1.0}
            )
    for trial in trials[:2]:  # a: its last epoch; b: ASHA
        first.on_trial_complete(0, trials, trial)
        trial.status = "TERMINATED"
    first.on_step_end(0, trials)
    for trial in trials[2:]:  # the budget's stop_all: c running, d pending, e after its last epoch
        trial.status = "TERMINATED"
    first.on_step_end(0, trials)
    first.on_experiment_end(trials)
    status = {
        "a": "finished",
        "b": "stopped_early",
        "c": "stopped_by_budget",
        "d": "stopped_by_budget",
        "e": "finished",
    }
    written = pd.read_parquet(tmp_path / "results" / "b" / "trials.parquet").set_index("trial_id")[
        "status"
    ]
    assert written.to_dict() == status

    again = recorder()  # --resume: Tune restores every trial as TERMINATED, without callbacks
    again.on_experiment_end(trials)
    written = pd.read_parquet(tmp_path / "results" / "b" / "trials.parquet").set_index("trial_id")[
        "status"
    ]
    assert written.to_dict() == status


@pytest.fixture(scope="module")
def head_search(tmp_path_factory, demo_dir, s3_server):
    """A head-only search with a conditional parameter, its results in the bucket."""
    folder = tmp_path_factory.mktemp("head-search")
    space = write_space(
        folder / "heads.yaml",
        demo_dir,
        experiment="heads",
        num_samples=HEAD_TRIALS,
        max_epochs=4,
        search={"max_concurrent": 2},
        resources={"head_cpus": 1},
        fixed={"freeze": "head", "batch_size": 32, "num_workers": 0, "feature_views": 1},
        space={
            "head": {"choice": ["linear", "mlp"]},
            "head_hidden": [{"when": {"head": "mlp"}, "choice": [32, 64]}],
            "lr": {"loguniform": [1.0e-3, 3.0e-2]},
        },
    )
    results = s3_server.uri("budget-searches")
    completed = run_script(
        "tune.py",
        "--space",
        str(space),
        "--results",
        results,
        cwd=folder,
        env={**os.environ, **s3_server.env},
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    assert list(folder.iterdir()) == [space]  # nothing of the search on the local disk
    return {"space": space, "results": results, "output": completed.stdout}


@pytest.fixture
def gpu_node(s3):
    """A one-node Ray cluster that declares one GPU, started with the S3 server's settings in its
    environment, as a user starts a node (its workers inherit them). No GPU is used: a head-only
    trial holding a share of it trains on the CPU, torch finding no CUDA device."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 2,
            "num_gpus": 1,
            "include_dashboard": True,
            "dashboard_host": "127.0.0.1",
        },
    )
    try:
        yield cluster
    finally:
        cluster.shutdown()


def test_a_warm_start_hands_trials_on_and_a_gpu_budget_ends_the_search(
    head_search, tmp_path, s3, gpu_node
):
    space, results = head_search["space"], head_search["results"]
    trials = s3.parquet("budget-searches/heads/trials.parquet")
    assert len(trials) == HEAD_TRIALS and trials["trial_id"].is_unique
    assert set(trials["status"]) <= {"finished", "stopped_early"}, trials["status"]
    # head_hidden is drawn for mlp heads only; a linear head's cell is empty
    mlp = trials["config.head"] == "mlp"
    assert trials.loc[mlp, "config.head_hidden"].isin([32, 64]).all()
    assert trials.loc[~mlp, "config.head_hidden"].isna().all() and (~mlp).any() and mlp.any()

    # A narrower search of the same problem learns from the first one's trials before its own, on
    # a node with a GPU, with a GPU-hour budget that its first reported epoch spends.
    document = yaml.safe_load(space.read_text())
    document["experiment"] = "narrow"
    document["search"] = {**document["search"], "num_samples": 20, "budget_gpu_hours": GPU_BUDGET}
    document["resources"] = {**document["resources"], "head_gpus": HEAD_GPUS}
    document["space"]["lr"] = {"loguniform": [3.0e-3, 3.0e-2]}
    narrow = tmp_path / "narrow.yaml"
    narrow.write_text(yaml.safe_dump(document))
    started = time.monotonic()
    second = run_script(  # the earlier search named by its folder in the bucket
        "tune.py",
        "--space",
        str(narrow),
        "--results",
        results,
        "--warm-start",
        f"{results}/heads",
        "--address",
        gpu_node.address,
    )
    ran_hours = (time.monotonic() - started) / 3600
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]

    # The budget ended the search: no trial started after it, and the ones running or pending were
    # stopped as stopped_by_budget, told apart from ASHA's stops and from finished trials.
    search = s3.json("budget-searches/narrow/search.json")
    stopped = s3.parquet("budget-searches/narrow/trials.parquet")
    assert search["budget"] == {"gpu_hours": GPU_BUDGET, "hours": 0.0, "final_fit_share": 0.1}
    assert search["ended_by"] == "budget_gpu_hours", search
    assert 1 <= len(stopped) <= 2, stopped  # max_concurrent: none started after the stop
    assert (stopped["status"] == "stopped_by_budget").all(), stopped[["status", "epochs_run"]]
    assert (stopped["epochs_run"] < 4).all() and (stopped["epochs_run"] >= 1).any(), stopped
    # GPU-hours: each trial's reported time times the GPU share it held, summed in search.json.
    assert np.allclose(stopped["gpu_hours"], stopped["wall_s"] * HEAD_GPUS / 3600)
    spent = search["spent"]
    assert spent["gpu_hours"] == pytest.approx(stopped["gpu_hours"].sum())
    assert spent["gpu_hours"] >= 0.9 * GPU_BUDGET and 0 < spent["hours"] <= ran_hours
    assert (
        f"the search ended on its budget (budget_gpu_hours): spent {spent['hours']:.3f} of - "
        f"hours, {spent['gpu_hours']:.3f} of {GPU_BUDGET} GPU-hours; the rest is the final fit's"
    ) in second.stdout.splitlines()

    # The warm start: the first search's trials inside this space, given to the study before the
    # first new trial.
    scored = trials[trials["epochs_run"] > 0]
    inside = scored[scored["config.lr"].between(3.0e-3, 3.0e-2)]
    assert 0 < len(inside) < len(scored), trials["config.lr"]  # trials given and trials skipped
    assert (
        f"warm start: {len(inside)} trial(s) of {results}/heads; "
        f"{len(scored) - len(inside)} outside this space skipped; "
        f"{len(trials) - len(scored)} stopped before a result skipped"
    ) in second.stdout.splitlines()
    journal = s3.download("budget-searches/narrow/study.journal", tmp_path / "study.journal")
    study = optuna.load_study(
        study_name="narrow",
        storage=optuna.storages.JournalStorage(
            optuna.storages.journal.JournalFileBackend(str(journal))
        ),
    )
    given = [t for t in study.trials if "warm_start" in t.user_attrs]
    assert sorted(t.user_attrs["warm_start"] for t in given) == sorted(
        f"heads/{i}" for i in inside["trial_id"]
    )
    assert sorted(t.params["lr"] for t in given) == sorted(inside["config.lr"])
    new = [t for t in study.trials if "warm_start" not in t.user_attrs]
    assert max(t.number for t in given) < min(t.number for t in new)
    assert len(new) == len(stopped)


def test_fold_refits_predict_out_of_fold_and_greedy_selection_is_scored_honestly(head_search, s3):
    import torch

    from sketch_core.config import TrainConfig
    from sketch_core.data import read_test_table, read_train_table, split_indices
    from sketch_core.demo_data import known_answers
    from sketch_core.duplicates import duplicate_groups
    from sketch_core.engine import TrainingRun
    from sketch_core.ensemble import log_loss

    results, folds = head_search["results"], 3
    completed = run_script(
        "final_fit.py",
        "--best",
        "--results",
        results,
        "--name",
        "heads",
        "--top-k",
        "3",
        "--folds",
        str(folds),
        "--ensemble",
        "greedy",
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    fits = {key.split("/")[3] for key in s3.keys("budget-searches/heads/final/") if "/fit-" in key}
    assert len(fits) == 1, fits
    fitted = f"budget-searches/heads/final/{fits.pop()}"  # fit-<time>, in the bucket
    fit = s3.json(f"{fitted}/fit.json")
    train = read_train_table(fit["data_dir"])
    members = ["top1", "top2", "top3"]
    groups = duplicate_groups(train.paths, train.targets)  # the folds keep near-duplicates together
    for member in members:
        covered = np.zeros(len(train.paths), dtype=int)
        seed = next(m["seed"] for m in fit["models"] if m["model_id"].startswith(member))
        for fold in range(folds):
            with np.load(
                io.BytesIO(s3.read(f"{fitted}/heldout-{member}-fold{fold}.npz"))
            ) as heldout:
                rows = heldout["rows"]
            trained_on, held_out = split_indices(
                train.targets, val_fraction=0.0, folds=folds, fold=fold, seed=seed, groups=groups
            )
            assert sorted(rows) == sorted(held_out) and not set(rows) & set(
                trained_on
            )  # never its own images
            covered[rows] += 1
        assert (
            covered == 1
        ).all()  # every training image predicted exactly once, by the fold that left it out
        oof = np.load(io.BytesIO(s3.read(f"{fitted}/oof-{member}.npy")))
        assert oof.shape == (len(train.paths), train.num_classes) and np.allclose(
            oof.sum(1), 1, atol=1e-4
        )
    summary = fit["out_of_fold"]
    best_member = min(summary["members"][m]["log_loss_calibrated"] for m in members)
    assert (
        summary["ensemble"]["method"] == "greedy"
        and summary["ensemble"]["log_loss"] <= best_member + 1e-9
    )
    oof_ensemble = np.load(io.BytesIO(s3.read(f"{fitted}/oof-ensemble.npy")))
    assert log_loss(oof_ensemble, train.targets) == pytest.approx(summary["ensemble"]["log_loss"])
    for member in members:  # a temperature fitted out of fold never raises the out-of-fold log-loss
        assert (
            summary["members"][member]["log_loss_calibrated"]
            <= summary["members"][member]["log_loss"] + 1e-9
        )
    assert sum(fit["ensemble"]["weights"].values()) == pytest.approx(1.0)
    lines = completed.stdout.splitlines()
    for member in members:
        assert any(
            line.startswith(f"  {member}")
            and f"accuracy {summary['members'][member]['accuracy']:.4f}" in line
            for line in lines
        ), lines
    estimate, test_accuracy = summary["estimate"], fit["test_accuracy"]["ensemble"]
    assert (
        f"cross-validated accuracy of the submitted ensemble: {estimate['accuracy']:.4f} "
        in completed.stdout
    )
    assert (
        f"ensemble {test_accuracy:.4f}" in completed.stdout
    )  # side by side with the answers' accuracy
    # The two agree within their errors: the folds' standard error and the test set's binomial one.
    test_error = (test_accuracy * (1 - test_accuracy) / 240) ** 0.5
    assert (
        abs(estimate["accuracy"] - test_accuracy)
        <= 2 * (estimate["standard_error"] ** 2 + test_error**2) ** 0.5
    )
    # By default each model predicts every test image and its horizontal flip, averaged: what its
    # saved weights predict with test-time augmentation, not what they predict without it.
    # (--no-tta: test_final_fit.py.)
    assert fit["tta"] is True
    test = read_test_table(fit["data_dir"])
    model = fit["models"][0]
    run = TrainingRun(TrainConfig.from_dict(model["config"]))
    weights = torch.load(
        io.BytesIO(s3.read(f"{fitted}/{model['model_id']}.pt")),
        map_location="cpu",
        weights_only=True,
    )
    run.eval_model.load_state_dict(weights["model"])
    probs = np.load(io.BytesIO(s3.read(f"{fitted}/probs-{model['model_id']}.npy")))
    np.testing.assert_allclose(probs, run.predict(test.paths, tta=True), atol=1e-5)
    assert np.abs(probs - run.predict(test.paths, tta=False)).max() > 1e-3
    # The submission, in the bucket: a row per test image, scored against the demo's answers.
    assert fit["submission"] == f"{results}/heads/final/submission.csv"
    submission = pd.read_csv(io.BytesIO(s3.read("budget-searches/heads/final/submission.csv")))
    assert (
        submission["image_path"].tolist()
        == read_test_table(fit["data_dir"]).frame["image_path"].tolist()
    )
    answers = known_answers(fit["data_dir"], submission["image_path"])
    assert (submission["target"] == answers).mean() == pytest.approx(test_accuracy)
    # report.py on the bucket experiment, as final_fit wrote it: the refit's table and diagram.
    s3.fs.delete_dir("hpo/budget-searches/heads/report")
    reported = run_script("report.py", "--results", results, "--name", "heads")
    assert reported.stdout.strip() == f"report: {results}/heads/report", reported.stderr[-3000:]
    report = s3.read("budget-searches/heads/report/summary.md").decode()
    assert (
        f"## Refit on 3 folds (final/{fitted.rsplit('/', 1)[1]})" in report
        and "![reliability](reliability.png)" in report
    )
    assert len(s3.read("budget-searches/heads/report/reliability.png")) > 1000
    assert f"| **ensemble** (greedy) | {summary['ensemble']['accuracy']:.4g} |" in report


def test_greedy_selection_needs_folds(head_search, s3):
    completed = run_script(
        "final_fit.py",
        "--best",
        "--results",
        head_search["results"],
        "--name",
        "heads",
        "--ensemble",
        "greedy",
    )
    assert completed.returncode == 2 and completed.stderr.strip() == (
        "error: --ensemble greedy: needs --folds K "
        "(it chooses the weights on out-of-fold predictions); "
        "--from-trials chooses its own on the validation predictions"
    )
