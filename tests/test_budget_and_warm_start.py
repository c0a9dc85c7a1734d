"""tune.py, final_fit.py and report.py on the demo data, as a user runs them, with the results in a
bucket of a real S3 server: a wall-clock budget ends a head-only search with a conditional
parameter, a second search warm-starts from its trials, and its top configurations are refitted on
folds and combined by greedy selection out of fold."""

import io
import os

import numpy as np
import optuna
import pandas as pd
import pytest
import yaml
from conftest import run_script, write_space

pytestmark = pytest.mark.e2e  # real commands on local Ray: the fast tier is pytest -m "not e2e"

BUDGET_HOURS = 0.01  # 36 s of a search whose trials take a second or two each (the first one ~10 s)


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
    """A head-only search with a conditional parameter that its wall-clock budget ends, its results
    in the bucket."""
    folder = tmp_path_factory.mktemp("head-search")
    space = write_space(
        folder / "heads.yaml",
        demo_dir,
        experiment="budget",
        num_samples=400,
        max_epochs=4,
        search={"budget_hours": BUDGET_HOURS, "max_concurrent": 2},
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


def test_a_budget_ends_the_search_and_a_warm_start_hands_its_trials_on(head_search, tmp_path, s3):
    space, results = head_search["space"], head_search["results"]
    search = s3.json("budget-searches/budget/search.json")
    trials = s3.parquet("budget-searches/budget/trials.parquet")
    assert search["ended_by"] == "budget_hours" and search["budget"] == {
        "hours": BUDGET_HOURS,
        "gpu_hours": 0.0,
    }
    assert (
        BUDGET_HOURS <= search["spent"]["hours"] < BUDGET_HOURS + 0.01
        and search["spent"]["gpu_hours"] == 0
    )
    assert 4 <= len(trials) < 400, len(trials)  # it ran, then stopped starting trials
    assert (
        "the search ended on its budget (budget_hours): "
        f"spent {search['spent']['hours']:.3f} of {BUDGET_HOURS} "
        "hours" in head_search["output"]
    )
    # The trials running or pending when the budget ran out are told apart from ASHA's stops.
    assert set(trials["status"]) <= {"finished", "stopped_early", "stopped_by_budget"}, trials[
        "status"
    ]
    by_budget = trials[trials["status"] == "stopped_by_budget"]
    assert len(by_budget) <= 2 and (by_budget["epochs_run"] < 4).all(), trials[
        ["status", "epochs_run"]
    ]
    # head_hidden is drawn for mlp heads only; a linear head's cell is empty
    mlp = trials["config.head"] == "mlp"
    assert trials.loc[mlp, "config.head_hidden"].isin([32, 64]).all()
    assert trials.loc[~mlp, "config.head_hidden"].isna().all() and (~mlp).any() and mlp.any()

    # A narrower search of the same problem learns from the first one's trials before its own.
    document = yaml.safe_load(space.read_text())
    document["experiment"], document["search"] = (
        "narrow",
        {**document["search"], "num_samples": 2, "budget_hours": 0},
    )
    document["space"]["lr"] = {"loguniform": [3.0e-3, 3.0e-2]}
    narrow = tmp_path / "narrow.yaml"
    narrow.write_text(yaml.safe_dump(document))
    second = run_script(  # the earlier search named by its folder in the bucket
        "tune.py", "--space", str(narrow), "--results", results, "--warm-start", f"{results}/budget"
    )
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    scored = trials[
        trials["epochs_run"] > 0
    ]  # the budget may stop a trial before its first epoch ends
    inside = scored[scored["config.lr"].between(3.0e-3, 3.0e-2)]
    unscored = len(trials) - len(scored)
    assert (
        f"warm start: {len(inside)} trial(s) of {results}/budget; "
        f"{len(scored) - len(inside)} outside this space skipped; "
        f"{unscored} stopped before a result skipped"
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
        f"budget/{i}" for i in inside["trial_id"]
    )
    assert sorted(t.params["lr"] for t in given) == sorted(inside["config.lr"])
    assert (
        len(study.trials) == len(given) + 2
        and len(s3.parquet("budget-searches/narrow/trials.parquet")) == 2
    )


def test_fold_refits_predict_out_of_fold_and_greedy_selection_is_scored_honestly(head_search, s3):
    from sketch_core.data import read_test_table, read_train_table, split_indices
    from sketch_core.demo_data import known_answers
    from sketch_core.duplicates import duplicate_groups
    from sketch_core.ensemble import log_loss

    results, folds = head_search["results"], 3
    completed = run_script(
        "final_fit.py",
        "--best",
        "--results",
        results,
        "--name",
        "budget",
        "--top-k",
        "3",
        "--folds",
        str(folds),
        "--ensemble",
        "greedy",
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    fits = {key.split("/")[3] for key in s3.keys("budget-searches/budget/final/") if "/fit-" in key}
    assert len(fits) == 1, fits
    fitted = f"budget-searches/budget/final/{fits.pop()}"  # fit-<time>, in the bucket
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
    # The submission, in the bucket: a row per test image, scored against the demo's answers.
    assert fit["submission"] == f"{results}/budget/final/submission.csv"
    submission = pd.read_csv(io.BytesIO(s3.read("budget-searches/budget/final/submission.csv")))
    assert (
        submission["image_path"].tolist()
        == read_test_table(fit["data_dir"]).frame["image_path"].tolist()
    )
    answers = known_answers(fit["data_dir"], submission["image_path"])
    assert (submission["target"] == answers).mean() == pytest.approx(test_accuracy)
    # report.py on the bucket experiment, as final_fit wrote it: the refit's table and diagram.
    s3.fs.delete_dir("hpo/budget-searches/budget/report")
    reported = run_script("report.py", "--results", results, "--name", "budget")
    assert reported.stdout.strip() == f"report: {results}/budget/report", reported.stderr[-3000:]
    report = s3.read("budget-searches/budget/report/summary.md").decode()
    assert (
        f"## Refit on 3 folds (final/{fitted.rsplit('/', 1)[1]})" in report
        and "![reliability](reliability.png)" in report
    )
    assert len(s3.read("budget-searches/budget/report/reliability.png")) > 1000
    assert f"| **ensemble** (greedy) | {summary['ensemble']['accuracy']:.4g} |" in report


def test_greedy_selection_needs_folds(head_search, s3):
    completed = run_script(
        "final_fit.py",
        "--best",
        "--results",
        head_search["results"],
        "--name",
        "budget",
        "--ensemble",
        "greedy",
    )
    assert completed.returncode == 2 and completed.stderr.strip() == (
        "error: --ensemble greedy: needs --folds K "
        "(it chooses the weights on out-of-fold predictions)"
    )
