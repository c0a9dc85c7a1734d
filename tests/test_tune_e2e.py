"""ray_jobs/tune.py end to end on local Ray with demo data."""

import json
import os
import signal
import subprocess
import time

import pandas as pd
import pytest

from conftest import run_script, started_script, wait_for, write_space


def test_results_exist_and_agree(finished_search):
    folder = finished_search["results"] / "e2e"
    trials = pd.read_parquet(folder / "trials.parquet")
    epochs = pd.read_parquet(folder / "epochs.parquet")
    best = json.loads((folder / "best.json").read_text())

    assert len(trials) == 5 and trials["trial_id"].is_unique
    assert {"status", "epochs_run", "best_val_acc", "best_epoch", "wall_s", "gpu_hours", "node", "error",
            "feature_cache", "config.lr", "config.head"} <= set(trials.columns)
    assert (trials["feature_cache"] == 0).all()  # every trial trains its whole model
    assert set(trials["status"]) <= {"finished", "stopped_early"}
    assert (trials["status"] == "stopped_early").any(), "ASHA stopped no trial"
    assert (trials["status"] == "finished").any()
    stopped = trials[trials["status"] == "stopped_early"]
    assert (stopped["epochs_run"] < 3).all()

    assert {"trial_id", "epoch", "val_acc", "val_loss", "train_loss", "lr", "images_per_s"} <= set(epochs.columns)
    assert (epochs.groupby("trial_id")["epoch"].max().sort_index()
            == trials.set_index("trial_id")["epochs_run"].sort_index()).all()
    top = epochs.loc[epochs["val_acc"].idxmax()]
    assert best["val_acc"] == pytest.approx(top["val_acc"]) == pytest.approx(trials["best_val_acc"].max())
    assert best["trial_id"] == trials.loc[trials["best_val_acc"].idxmax(), "trial_id"]
    assert best["epoch"] == trials.set_index("trial_id").loc[best["trial_id"], "best_epoch"]
    assert best["config"]["lr"] == trials.set_index("trial_id").loc[best["trial_id"], "config.lr"]
    assert os.path.isdir(best["checkpoint"]) and (folder / "tune").is_dir()
    assert best["val_acc"] > 1 / 8, "the search learned nothing"


def test_progress_and_summary_are_printed(finished_search):
    output = finished_search["output"]
    assert "Ray dashboard: http://127.0.0.1:" in output
    assert "val_acc" in output and "images_per_s" in output
    assert "best trial" in output and "trials.parquet" in output


def test_existing_experiment_needs_resume(finished_search):
    result = run_script("tune.py", "--space", str(finished_search["space"]), "--results",
                        str(finished_search["results"]), timeout=120)
    assert result.returncode == 2
    assert "experiment already exists; pass --resume" in result.stderr and "Traceback" not in result.stderr


def test_infeasible_trial_fails_fast(tmp_path, demo_dir):
    space = write_space(tmp_path / "space.yaml", demo_dir, resources={"workers": 4, "gpus_per_worker": 1})
    started = time.monotonic()
    result = run_script("tune.py", "--space", str(space), "--results", str(tmp_path / "results"), timeout=120)
    assert time.monotonic() - started < 60
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "resources: one worker needs 0.9 CPU, 1 GPU, but no node of this cluster has that much" in result.stderr
    assert not (tmp_path / "results" / "e2e" / "trials.parquet").exists()


@pytest.mark.parametrize("space_change, args, message", [
    ({"space": {"lr": {"loguniform": [0.1, 0.001]}}}, [], "space.lr: loguniform: low (0.1) must be below high"),
    ({}, ["--num-samples", "0"], "--num-samples: expected at least 1, got 0"),
    ({"data": {"dir": "/nonexistent/sketch"}}, [], "/nonexistent/sketch: data directory not found"),
    ({}, ["--resume"], "no search to resume"),
    ({"model": {"name": "test_resnet.r160_in1k", "pretrained": True}}, [],
     "model test_resnet.r160_in1k: pretrained weights could not be fetched"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, demo_dir, capsys, monkeypatch, space_change, args,
                                                  message):
    import huggingface_hub.constants

    from ray_jobs import tune

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # weights unreachable, as on CI

    space = write_space(tmp_path / "space.yaml", demo_dir, **space_change)
    assert tune.main(["--space", str(space), "--results", str(tmp_path / "results"), *args]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert not (tmp_path / "results").exists()


def test_resume_after_the_driver_is_killed_and_after_ctrl_c(tmp_path, demo_dir):
    space = write_space(tmp_path / "space.yaml", demo_dir, experiment="stopped", num_samples=3, max_epochs=2)
    results = tmp_path / "results"
    trials_file, epochs_file = results / "stopped" / "trials.parquet", results / "stopped" / "epochs.parquet"
    command = ("tune.py", "--space", str(space), "--results", str(results))
    with started_script(*command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) as driver:
        wait_for(lambda: trials_file.exists() and (pd.read_parquet(trials_file)["epochs_run"] > 0).sum() >= 2,
                 "two trials reporting", driver, timeout=600)
        driver.send_signal(signal.SIGKILL)  # kill -9, a lost SSH session
        driver.wait()
        before_kill = pd.read_parquet(epochs_file)
    # Leaving the block stopped what the killed driver left of its local Ray, which outlives it.

    with started_script(*command, "--resume", stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as driver:
        wait_for(lambda: len(pd.read_parquet(epochs_file)) > len(before_kill), "an epoch after --resume", driver,
                 timeout=600)
        driver.send_signal(signal.SIGINT)  # Ctrl-C: Tune saves the search and stops its trials
        output, _ = driver.communicate(timeout=300)
    assert driver.returncode == 130 and "interrupted; continue with --resume" in output, output[-3000:]
    assert "no trial reported" not in output and "Traceback" not in output, output[-3000:]
    assert "interrupted" in set(pd.read_parquet(trials_file)["status"])
    before_ctrl_c = pd.read_parquet(epochs_file)

    resumed = run_script(*command, "--resume")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    trials = pd.read_parquet(trials_file)
    epochs = pd.read_parquet(epochs_file)
    assert len(trials) == 3 and trials["trial_id"].is_unique
    assert set(trials["status"]) <= {"finished", "stopped_early"}
    for before in (before_kill, before_ctrl_c):
        kept = before.merge(epochs, on=["trial_id", "epoch"], how="left", suffixes=("", "_after"))
        assert kept["val_acc_after"].notna().all(), "rows written before the stop were lost"
    assert (epochs.groupby("trial_id")["epoch"].max().sort_index()
            == trials.set_index("trial_id")["epochs_run"].sort_index()).all()
