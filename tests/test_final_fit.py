"""ray_jobs/final_fit.py after the shared demo search: --from-trials (the quickstart's), --best,
--trial, folds, errors."""

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import own_output, run_script, started_script, wait_for

from ray_jobs.results import SCHEMA_VERSION
from sketch_core.demo_data import known_answers

pytestmark = pytest.mark.e2e  # real commands on local Ray: the fast tier is pytest -m "not e2e"


def read_fit_logs(experiment_dir):
    return sorted(experiment_dir.glob("final/fit-*/fit.json"))


def accuracy(submission, data_dir):
    return (
        submission["target"].to_numpy() == known_answers(data_dir, submission["image_path"])
    ).mean()


def test_the_quickstart_submission_ensembles_the_searchs_own_models(finished_search):
    """`python ray_jobs/final_fit.py --from-trials` as the README gives it, in a fresh clone, after
    its search: no retraining; every trial's model at its best epoch predicts its validation images
    and the test set, greedy selection weighs them, and the submission is that ensemble."""
    from sketch_core.ensemble import Ensemble

    folder, data_dir = finished_search["results"] / "demo", finished_search["data_dir"]
    submission = pd.read_csv(folder / "final" / "submission.csv")
    test = pd.read_csv(data_dir / "test.csv")
    assert list(submission.columns) == ["ID", "image_path", "target"]
    assert submission["ID"].tolist() == list(range(len(test)))
    assert submission["image_path"].tolist() == test["image_path"].tolist()
    assert accuracy(submission, data_dir) > 0.75  # 24 classes: chance is 0.04
    trials = pd.read_parquet(folder / "trials.parquet")
    fit_json = read_fit_logs(folder)[0]  # the quickstart's: later tests add their own fits
    log, fit_folder = json.loads(fit_json.read_text()), fit_json.parent
    assert log["how"] == "from_trials" and log["tta"] is True
    assert {m["source_trial"] for m in log["models"]} == set(trials["trial_id"])  # 5 < top-k 10
    by_trial = trials.set_index("trial_id")
    assert all(m["epochs"] == by_trial.loc[m["source_trial"], "best_epoch"] for m in log["models"])
    assert not list(fit_folder.glob("*.pt"))  # the trials' checkpoints are the models
    # The ensemble is what fit.json says: each member's test probabilities at its temperature,
    # weighted; the submission is its argmax.
    members = {
        f"trial-{m['source_trial']}": np.load(fit_folder / f"probs-{m['model_id']}.npy")
        for m in log["models"]
    }
    chosen = Ensemble(log["ensemble"]["weights"], log["ensemble"]["temperatures"])
    assert sum(chosen.weights.values()) == pytest.approx(1.0)
    ensemble = np.load(fit_folder / "probs-ensemble.npy")
    np.testing.assert_allclose(ensemble, chosen(members), rtol=1e-5, atol=1e-7)
    assert (submission["target"].to_numpy() == ensemble.argmax(1)).all()
    # Its estimate comes from validation images each selection did not see.
    estimate = log["from_trials"]["estimate"]
    assert estimate["images"] == 192 and len(estimate["halves"]) == 2
    assert 0.5 < estimate["ensemble"]["accuracy"] <= 1 and 0.5 < estimate["single"]["accuracy"] <= 1
    assert log["test_accuracy"]["ensemble"] == pytest.approx(accuracy(submission, data_dir))
    lines = finished_search["refit_output"].splitlines()
    assert f"submission: {folder / 'final' / 'submission.csv'}" in lines
    for model in log["models"]:
        assert (
            f"{model['model_id']} as it was at epoch {model['epochs']} predicted {len(submission)} "
            "test images"
        ) in lines
    assert any(
        line.startswith("greedy selection by log_loss, chosen on one half of these images")
        for line in lines
    )
    assert any(line.startswith("accuracy against test_answers.csv: ") for line in lines)
    assert not any(
        "Reporting training result" in line or "Trial status" in line or "WARNING" in line
        for line in lines
    ), lines


def test_sketch_core_train_predicts_the_same_probabilities_as_final_fit(finished_search, tmp_path):
    """One prediction path: the best trial's checkpoint, continued by python -m sketch_core.train
    with nothing left to train, predicts what final_fit.py --from-trials predicted with it (the
    same default test-time augmentation)."""
    import shutil
    import sys

    from conftest import REPO_ROOT

    from ray_jobs.trial import CHECKPOINT_FILE

    folder = finished_search["results"] / "demo"
    best = json.loads((folder / "best.json").read_text())
    out = tmp_path / "run"
    out.mkdir()
    shutil.copy(Path(best["checkpoint"]) / CHECKPOINT_FILE, out / "last.pt")
    options = [
        f"--{key.replace('_', '-')}={value}"
        for key, value in best["config"].items()
        if key != "epochs"
    ]
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "sketch_core.train",
            *options,
            f"--epochs={best['epoch']}",
            "--out",
            str(out),
            "--resume",
            "--predict",
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    fit_folder = read_fit_logs(folder)[0].parent
    np.testing.assert_allclose(
        np.load(out / "probs.npy"),
        np.load(fit_folder / f"probs-trial-{best['trial_id']}.npy"),
        atol=1e-6,
    )


def test_top_k_picks_the_best_distinct_configurations_each_on_every_fold(finished_search):
    from ray_jobs.refit import choose_models

    folder = finished_search["results"] / "demo"
    trials = pd.read_parquet(folder / "trials.parquet")
    search = json.loads((folder / "search.json").read_text())
    specs = choose_models(
        trials,
        metric="val_acc",
        mode="max",
        searched=search["searched"],
        base=search["base"],
        top_k=2,
        folds=3,
        epochs=None,
        data_dir="/data",
    )
    assert [s.model_id for s in specs] == [f"top{k}-fold{f}" for k in (1, 2) for f in range(3)]
    ranked = trials[trials["best_epoch"] > 0].sort_values(
        "best_val_acc", ascending=False, kind="stable"
    )
    assert specs[0].source_trial == json.loads((folder / "best.json").read_text())["trial_id"]
    assert specs[0].source_trial == ranked["trial_id"].iloc[0]
    assert specs[3].source_trial == ranked["trial_id"].iloc[1]
    assert [(s.config["folds"], s.config["fold"]) for s in specs[:3]] == [(3, 0), (3, 1), (3, 2)]
    by_trial = ranked.set_index("trial_id")
    assert all(s.until_epoch == by_trial.loc[s.source_trial, "best_epoch"] for s in specs)
    assert all(s.config["data_dir"] == "/data" for s in specs)

    whole = choose_models(
        trials,
        metric="val_acc",
        mode="max",
        searched=search["searched"],
        base=search["base"],
        top_k=1,
        folds=0,
        epochs=7,
        data_dir="/data",
    )
    assert [
        (s.model_id, s.until_epoch, s.config["epochs"], s.config["val_fraction"]) for s in whole
    ] == [("top1", 7, 7, 0.0)]

    # Two trials that drew the same searched values are one configuration: the lower-ranked is
    # dropped and the next distinct configuration taken.
    first, second, third = ranked["trial_id"].iloc[:3]
    searched = [f"config.{name}" for name in search["searched"]]
    twins = trials.set_index("trial_id")
    twins.loc[second, searched] = twins.loc[first, searched]
    twins = twins.reset_index()
    assert twins.duplicated(subset=searched).sum() == 1  # the quickstart's five trials all differ
    distinct = choose_models(
        twins,
        metric="val_acc",
        mode="max",
        searched=search["searched"],
        base=search["base"],
        top_k=2,
        folds=0,
        epochs=None,
        data_dir="/data",
    )
    assert [(s.model_id, s.source_trial) for s in distinct] == [("top1", first), ("top2", third)]
    assert distinct[1].until_epoch == by_trial.loc[third, "best_epoch"]  # the third's own

    tied = trials.assign(best_val_acc=0.5)  # on a tie the first trial wins, as in best.json
    first = choose_models(
        tied,
        metric="val_acc",
        mode="max",
        searched=search["searched"],
        base=search["base"],
        top_k=1,
        folds=0,
        epochs=None,
        data_dir="/data",
    )[0]
    assert first.source_trial == tied.loc[tied["best_epoch"] > 0, "trial_id"].iloc[0]


def own_copy(finished_search, folder: Path) -> Path:
    """The quickstart's experiment (its tables, best.json, search.json, report and final/ with the
    quickstart's submission; not Tune's folders) copied into ``folder``/results, for a test that
    writes fits and submissions: the shared quickstart results stay as the search left them."""
    shutil.copytree(
        finished_search["results"] / finished_search["experiment"],
        folder / "results" / finished_search["experiment"],
        ignore=shutil.ignore_patterns("tune"),
    )
    return folder / "results"


def test_a_chosen_trial_on_folds_soft_votes_and_never_overwrites(
    finished_search, tmp_path, monkeypatch
):
    from sketch_core.config import TrainConfig
    from sketch_core.data import read_test_table
    from sketch_core.engine import TrainingRun, load_checkpoint

    # A folder laid out as the clone's root, with the quickstart's results and data copied in.
    work = tmp_path / "work"
    own_copy(finished_search, work)
    shutil.copytree(finished_search["data_dir"], work / "demo" / "sketches")
    folder = work / "results" / "demo"
    first_submission = (folder / "final" / "submission.csv").read_bytes()
    fits_before = read_fit_logs(folder)
    trials = pd.read_parquet(folder / "trials.parquet")
    # A head-only trial: its fold models train in a reused Tune process, in seconds.
    chosen = (
        trials[trials["config.freeze"] == "head"]
        .sort_values("best_val_acc", ascending=False, kind="stable")["trial_id"]
        .iloc[0]
    )
    # Every local path relative to where it runs: the default --results, --data-dir and
    # SKETCH_CACHE_DIR. The fold models train in a Tune trial process, whose working directory is
    # its trial's folder, where a relative path would miss.
    # --no-calibrate: the plain soft vote (calibration and greedy weights:
    # test_budget_and_warm_start.py)
    result = run_script(
        "final_fit.py",
        "--trial",
        chosen,
        "--name",
        "demo",
        "--folds",
        "2",
        "--no-tta",
        "--epochs",
        "2",
        "--no-calibrate",
        "--data-dir",
        "demo/sketches",
        cwd=work,
        env={**os.environ, "SKETCH_CACHE_DIR": "cache"},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert list((work / "cache").glob("features-*.pt")) and list(
        (work / "cache").glob("decoded-*.u8")
    )
    assert (folder / "final" / "submission.csv").read_bytes() == first_submission
    assert (folder / "final" / "submission-2.csv").is_file()
    (fit_json,) = set(read_fit_logs(folder)) - set(fits_before)
    log, fit_folder = json.loads(fit_json.read_text()), fit_json.parent
    assert log["data_dir"] == str(work / "demo" / "sketches")
    assert [m["model_id"] for m in log["models"]] == ["top1-fold0", "top1-fold1"]
    assert {m["source_trial"] for m in log["models"]} == {chosen} and {
        m["epochs"] for m in log["models"]
    } == {2}
    assert all(
        m["val_acc"] is not None for m in log["models"]
    )  # each fold model has its held-out fold
    # Soft vote: the ensemble is the mean of its members' probabilities and the submission its
    # argmax. Its accuracy may fall below a member's on 80 images, but by Jensen's inequality its
    # log-loss never exceeds the members' mean log-loss; a hard vote (one-hot) or a wrong mean
    # breaks this.
    assert log["ensemble"] == {
        "method": "mean",
        "weights": {"top1": 1.0},
        "temperatures": {"top1": 1.0},
    }
    train = pd.read_csv(finished_search["data_dir"] / "train.csv")
    assert np.load(fit_folder / "oof-top1.npy").shape == (
        len(train),
        train["target"].nunique(),
    )  # out of fold
    members = np.stack([np.load(fit_folder / f"probs-{m['model_id']}.npy") for m in log["models"]])
    ensemble = np.load(fit_folder / "probs-ensemble.npy")
    np.testing.assert_allclose(ensemble, members.mean(axis=0), rtol=1e-6)
    submission = pd.read_csv(folder / "final" / "submission-2.csv")
    assert (submission["target"].to_numpy() == ensemble.argmax(axis=1)).all()
    truth = known_answers(finished_search["data_dir"], submission["image_path"])
    rows = np.arange(len(truth))

    def log_loss(probs):
        return -np.log(np.clip(probs[..., rows, truth], 1e-12, None)).mean(axis=-1)

    assert log_loss(ensemble) <= log_loss(members).mean() + 1e-9
    assert set(log["test_accuracy"]) == {m["model_id"] for m in log["models"]} | {"ensemble"}
    assert "accuracy against test_answers.csv" in result.stdout

    # --no-tta: each model predicted the test images as they are, without their horizontal flips:
    # what its saved weights predict without test-time augmentation, not what they predict with it.
    # (The default, with it: test_budget_and_warm_start.py.)
    assert log["tta"] is False
    monkeypatch.setenv("SKETCH_CACHE_DIR", str(work / "cache"))  # the refit's features
    test = read_test_table(log["data_dir"])
    for model, probs in zip(log["models"], members):
        run = TrainingRun(TrainConfig.from_dict(model["config"]))
        run.eval_model.load_state_dict(
            load_checkpoint(fit_folder / f"{model['model_id']}.pt")["model"]
        )
        np.testing.assert_allclose(probs, run.predict(test.paths, tta=False), atol=1e-5)
        assert np.abs(probs - run.predict(test.paths, tta=True)).max() > 1e-3


def test_a_refit_spends_what_the_searchs_budget_left(finished_search, tmp_path):
    """A search with a wall-clock budget leaves final_fit.py --best the rest: the refit trains as
    many epochs as fit in it at the pace its trial kept, a whole schedule of that length, and ends
    about when the budget does."""
    from sketch_core.engine import load_checkpoint

    results = own_copy(finished_search, tmp_path)
    folder = results / "demo"
    search = json.loads((folder / "search.json").read_text())
    left_s = 60.0
    spent = search["spent"]["hours"]
    search["budget"] = {**search["budget"], "hours": spent + left_s / 3600}
    (folder / "search.json").write_text(json.dumps(search))
    fits_before = read_fit_logs(folder)
    started = time.monotonic()
    result = run_script("final_fit.py", "--best", "--results", str(results), "--name", "demo")
    took = time.monotonic() - started
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"budget left for the final fit: {left_s / 3600:.3g} of" in result.stdout
    (fit_json,) = set(read_fit_logs(folder)) - set(fits_before)
    log = json.loads(fit_json.read_text())
    (model,) = log["models"]
    given = log["budget_s_per_model"]
    assert 0 < given < left_s  # what was left once the final fit had started Ray
    line = re.search(
        rf"the budget gives each of 1 refit\(s\) {given:.0f} s \(1 at a time\): "
        rf"top1: (\d+) epochs \(trial {model['source_trial']}: ",
        result.stdout,
    )
    assert line, result.stdout[-3000:]
    epochs = int(line.group(1))
    # One whole schedule of that length, trained to its end.
    assert model["epochs"] == model["config"]["epochs"] == epochs
    assert load_checkpoint(fit_json.parent / "top1.pt")["epoch"] == epochs
    # Timed by the trial's own pace on this machine, it ends near the budget's end (loosely: the
    # machine is shared).
    assert took < 2 * left_s + 30, took


def test_errors(finished_search, tmp_path, capsys):
    from ray_jobs import final_fit as command

    def final_fit(*args):
        assert command.main(list(args)) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), lines
        return lines[0]

    assert "say how to build the submission: --from-trials" in final_fit(
        "--results", str(tmp_path / "empty")
    )
    assert "--from-trials: uses the search's models as they are" in final_fit(
        "--from-trials", "--folds", "2"
    )
    assert "--warm: continues a trial's model on all the data" in final_fit(
        "--best", "--warm", "--folds", "2"
    )
    assert "no experiment found" in final_fit("--best", "--results", str(tmp_path / "empty"))
    for option in ("--epochs", "--max-concurrent", "--top-k"):
        assert f"{option}: expected at least 1, got 0" in final_fit("--best", option, "0")

    experiment = finished_search["results"] / "demo"
    copied = tmp_path / "copy"
    shutil.copytree(experiment, copied / "demo", ignore=shutil.ignore_patterns("tune", "final"))
    (copied / "demo" / "best.json").unlink()
    assert "no finished trial yet" in final_fit("--best", "--results", str(copied))

    search = json.loads((experiment / "search.json").read_text())
    shutil.copy(experiment / "best.json", copied / "demo" / "best.json")
    (copied / "demo" / "search.json").write_text(json.dumps({**search, "schema": 0}))
    assert f"results schema 0, this version reads {SCHEMA_VERSION}" in final_fit(
        "--best", "--results", str(copied)
    )

    (copied / "demo" / "search.json").write_text(json.dumps(search))
    other = tmp_path / "other-data"
    from sketch_core.demo_data import generate

    generate(other, classes=3, images_per_class=4, test_images=3, min_size=32, max_size=48)
    assert "classes differ" in final_fit(
        "--best", "--results", str(copied), "--data-dir", str(other)
    )
    assert "--top-k 50: the search has only" in final_fit(
        "--best", "--results", str(copied), "--top-k", "50"
    )
    assert "--folds: expected 0 (no folds) or at least 2, got 1" in final_fit(
        "--best", "--results", str(copied), "--folds", "1"
    )
    assert "--trial nope: no trial with that id" in final_fit(
        "--trial", "nope", "--results", str(copied)
    )
    assert "--top-k 2: goes with --best" in final_fit(
        "--trial", "x", "--top-k", "2", "--results", str(copied)
    )

    # Trials validated on other images (another seed draws another split) cannot be ensembled
    # image by image.
    trials = pd.read_parquet(copied / "demo" / "trials.parquet")
    changed = trials.assign(**{"config.seed": [0] * (len(trials) - 1) + [1]})
    changed.to_parquet(copied / "demo" / "trials.parquet")
    message = final_fit("--from-trials", "--results", str(copied))
    assert re.search(
        r"--from-trials: trials \w+ and \w+ validated on other images \(seed (0 and 1|1 and 0)\)",
        message,
    ), message
    trials.to_parquet(copied / "demo" / "trials.parquet")

    # Files damaged by a full disk or a half-copied folder: one line naming the file.
    for name, damage in [
        ("trials.parquet", lambda data: data[: len(data) // 2]),
        ("search.json", lambda data: data[: len(data) // 2]),
        ("best.json", lambda data: b"{}"),
    ]:
        original = (copied / "demo" / name).read_bytes()
        (copied / "demo" / name).write_bytes(damage(original))
        message = final_fit("--best", "--results", str(copied))
        assert str(copied / "demo" / name) in message and "damaged" in message, message
        (copied / "demo" / name).write_bytes(original)


def test_unfinished_refits_are_told_apart_from_ctrl_c():
    from ray_jobs.final_fit import check_refits
    from sketch_core.errors import SketchError

    fitted = pd.DataFrame(
        [
            {"model_id": "top1", "done": True, "error": ""},
            {"model_id": "top2", "done": False, "error": ""},
        ]
    )
    with pytest.raises(
        SketchError, match="refit of top2 ended without predicting the test set; see /t"
    ):
        check_refits(fitted, interrupted=False, tune_folder="/t")
    with pytest.raises(KeyboardInterrupt):
        check_refits(fitted, interrupted=True, tune_folder="/t")
    failed = fitted.assign(error=["", "RuntimeError: out of memory"])
    with pytest.raises(SketchError, match="refit of top2 failed: RuntimeError: out of memory"):
        check_refits(failed, interrupted=False, tune_folder="/t")
    check_refits(fitted.assign(done=True), interrupted=False, tune_folder="/t")


def test_ctrl_c_during_the_refit_writes_no_submission(finished_search, tmp_path):
    """Ctrl-C while the refit's model trains: Ray Tune, which runs the refit as a trial, takes it
    and stops the trial; final_fit.py says so and writes no submission and no fit.json."""
    results = own_copy(finished_search, tmp_path)
    folder = results / "demo"
    submissions = {
        path.name: path.read_bytes() for path in (folder / "final").glob("submission*.csv")
    }
    fits, fit_folders = set(read_fit_logs(folder)), set(folder.glob("final/fit-*"))
    trials = pd.read_parquet(folder / "trials.parquet")
    # A head-only trial refitted for many epochs: its trial process starts in seconds, and the
    # Ctrl-C, sent once its first epoch is on the console, lands long before its last (about 25 ms
    # each) and its prediction.
    chosen = trials.loc[trials["config.freeze"] == "head", "trial_id"].iloc[0]
    log = tmp_path / "final_fit.log"
    with (
        log.open("w") as output,
        started_script(
            "final_fit.py",
            "--trial",
            chosen,
            "--epochs",
            "2000",
            "--results",
            str(results),
            stdout=output,
            stderr=subprocess.STDOUT,
        ) as driver,
    ):
        wait_for(
            lambda: "top1 epoch 1/2000: " in log.read_text(),
            "the refit's first epoch",
            driver,
            interval=0.2,
            log=log,
        )
        driver.send_signal(signal.SIGINT)
        driver.wait(timeout=300)
    output = log.read_text()
    assert "Stop signal received" in output, output[
        -3000:
    ]  # Ray Tune's own line: it caught the signal
    assert (
        driver.returncode == 130 and "interrupted; run final_fit.py again for a new fit" in output
    ), output[-3000:]
    assert "Traceback" not in own_output(output) and "error:" not in output, output[-3000:]
    # It stopped the refit amid its epochs: the model never reached its last or the test set.
    assert "top1 epoch 2000/2000" not in output and "predicted" not in output, output[-3000:]
    assert {
        path.name: path.read_bytes() for path in (folder / "final").glob("submission*.csv")
    } == submissions
    # The interrupted fit has its folder, and no fit.json to mistake for a good one.
    assert len(set(folder.glob("final/fit-*")) - fit_folders) == 1
    assert set(read_fit_logs(folder)) == fits
