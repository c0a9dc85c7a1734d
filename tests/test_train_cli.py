"""``python -m sketch_core.train`` as a user runs it."""

import json
import signal
import subprocess
import sys

import pandas as pd
from conftest import QUICK_TRAINING, REPO_ROOT, wait_for

from sketch_core import train


def run_cli(*args, cwd=REPO_ROOT):
    return subprocess.run(
        [sys.executable, "-m", "sketch_core.train", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
    )


def quick_options(demo_dir):
    options = ["--data-dir", str(demo_dir)]
    for name, value in QUICK_TRAINING.items():
        options += [f"--{name.replace('_', '-')}", str(value)]
    return options


def test_trains_resumes_and_predicts(demo_dir, tmp_path, capsys):
    out = tmp_path / "run"
    first = run_cli(*quick_options(demo_dir), "--epochs", "2", "--out", str(out))
    assert first.returncode == 0, first.stderr
    # The same --out again, without --resume: refused before training (in this process: the
    # command's own main, without a second start-up).
    assert train.main([*quick_options(demo_dir), "--epochs", "2", "--out", str(out)]) == 2
    again = capsys.readouterr().err
    assert again.startswith("error: ") and "pass --resume" in again
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    resumed = run_cli(
        *quick_options(demo_dir), "--epochs", "3", "--out", str(out), "--resume", "--predict"
    )
    assert resumed.returncode == 0, resumed.stderr
    epochs = [
        json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()
    ]
    assert epochs == [1, 2, 3]
    assert len(pd.read_csv(out / "submission.csv")) == 80
    # The trained backbone alone, as a search's model.checkpoint_file loads it.
    import torch

    from sketch_core.engine import load_checkpoint
    from sketch_core.models import create_backbone

    backbone = create_backbone(
        "test_resnet", pretrained=False, checkpoint_file=str(out / "backbone.safetensors")
    )
    trained = load_checkpoint(out / "last.pt")["model"]
    for name, tensor in backbone.state_dict().items():
        assert torch.equal(tensor, trained[f"backbone.{name}"]), name


def test_bad_option_is_one_line_without_traceback(demo_dir, tmp_path, capsys):
    result = run_cli("--data-dir", str(demo_dir), "--lr", "-1", "--out", str(tmp_path / "x"))
    assert result.returncode == 2
    assert result.stderr.strip() == "error: command line: lr: expected a value > 0.0, got -1.0"
    assert not (tmp_path / "x").exists()
    # The same error path for a missing data folder, in this process (an exception escaping main
    # would fail here as a traceback would there).
    assert train.main(["--data-dir", str(tmp_path / "nowhere"), "--out", str(tmp_path / "y")]) == 2
    missing = capsys.readouterr().err.strip().splitlines()
    assert len(missing) == 1 and missing[0].startswith("error: "), missing
    assert "data directory not found" in missing[0] and not (tmp_path / "y").exists()


def test_ctrl_c_is_one_line_and_the_run_resumes_from_its_last_epoch(demo_dir, tmp_path):
    out = tmp_path / "run"
    log = tmp_path / "train.log"
    with log.open("w") as stdout:
        process = subprocess.Popen(
            [sys.executable, "-m", "sketch_core.train", *quick_options(demo_dir)]
            + ["--epochs", "500", "--out", str(out)],
            cwd=REPO_ROOT,
            stdout=stdout,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            metrics = out / "metrics.jsonl"
            wait_for(lambda: metrics.exists() and metrics.read_text(), "an epoch", process, log=log)
            process.send_signal(signal.SIGINT)
            _, stderr = process.communicate(timeout=120)
        finally:
            process.kill()
    assert process.returncode == 130, stderr
    assert stderr.strip().splitlines() == [
        f"interrupted; continue with the same options and --resume (--out {out})"
    ], stderr
    # The last finished epoch's checkpoint is whole: --resume goes on from it (test above).
    from sketch_core.engine import load_checkpoint

    assert 1 <= load_checkpoint(out / "last.pt")["epoch"] < 500
