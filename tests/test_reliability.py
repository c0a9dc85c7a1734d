"""Faults survived, nothing lost: a killed worker, a failing trial, an interrupted write."""

import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch

from conftest import REPO_ROOT, started_script, wait_for, write_space
from sketch_core.engine import load_checkpoint
from sketch_core.errors import SketchError


def test_ended_trials_free_their_workers_while_the_search_goes_on(finished_search):
    """(An ASHA-stopped trial's workers: tests/test_trial_kinds.py.)"""
    released = finished_search["released"]  # watched while the shared search ran
    assert released, "no fine-tuning trial ended while the quickstart search went on"
    assert all(trial["after_s"] is not None for trial in released.values()), f"workers outlived their trial: {released}"


def test_killed_worker(tmp_path, demo_dir):
    """A worker killed from outside: its trial restarts from its checkpoint and the search completes.
    (Ended trials freeing their workers: the quickstart's and tests/test_trial_kinds.py; a
    configuration that always fails: tests/test_trial_kinds.py.)"""
    space = write_space(
        tmp_path / "space.yaml", demo_dir, experiment="faults", num_samples=1, max_epochs=4,
        search={"searcher": "grid", "max_failures": 1, "max_concurrent": 1},
        fixed={"freeze": "last_n_blocks", "trainable_blocks": 1}, space={"lr": {"grid": [5.0e-3]}},
    )
    results = tmp_path / "results"
    log = tmp_path / "tune.log"
    with log.open("w") as output, started_script("tune.py", "--space", str(space), "--results", str(results),
                                                 stdout=output, stderr=subprocess.STDOUT) as driver:
        epochs_file = results / "faults" / "epochs.parquet"

        def first_epoch_pids():
            epochs = pd.read_parquet(epochs_file) if epochs_file.exists() else None
            reported = epochs is not None and len(epochs) and epochs["epoch"].max() >= 1
            return str(epochs["pids"].iloc[0]) if reported else None

        killed_pid = int(wait_for(first_epoch_pids, "a first epoch", driver, timeout=900, interval=0.5, log=log)
                         .split(",")[-1])
        os.kill(killed_pid, signal.SIGKILL)  # a training worker dies, as on a preempted node
        driver.wait(timeout=900)
    output = log.read_text()
    assert driver.returncode == 0, output[-3000:]

    trials = pd.read_parquet(results / "faults" / "trials.parquet")
    epochs = pd.read_parquet(epochs_file)
    assert len(trials) == 1
    trial = trials.iloc[0]
    assert trial["status"] == "finished"  # all 4 epochs, despite the kill
    restarted = epochs[epochs["trial_id"] == trial["trial_id"]]
    assert (restarted["started_at_epoch"] > 0).any(), f"the killed trial did not resume from a checkpoint\n{output[-6000:]}"
    assert restarted["epoch"].tolist() == list(range(1, len(restarted) + 1))
    assert (results / "faults" / "best.json").is_file()


PAYLOAD_SIZE = 20_000_000
WRITER = """
import sys
sys.path.insert(0, sys.argv[1])
from ray_jobs.results import ResultsStore
store = ResultsStore(sys.argv[2], "exp")
while True:
    for fill in (b"a", b"b"):
        store.write_bytes("table.bin", fill * int(sys.argv[3]))
"""


def test_a_killed_writer_leaves_a_whole_version(tmp_path):
    from ray_jobs.results import ResultsStore

    store = ResultsStore(str(tmp_path), "exp")
    store.write_bytes("table.bin", b"a" * PAYLOAD_SIZE)
    for delay in (0.7, 1.3, 2.1):
        writer = subprocess.Popen([sys.executable, "-c", WRITER, str(REPO_ROOT), str(tmp_path), str(PAYLOAD_SIZE)])
        time.sleep(delay)
        writer.send_signal(signal.SIGKILL)
        writer.wait()
        content = store.read_bytes("table.bin")
        assert content in (b"a" * PAYLOAD_SIZE, b"b" * PAYLOAD_SIZE), "a half-written file replaced the last one"


def test_checkpoints_load_weights_only(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("code ran while loading",))

    torch.save({"model": {}, "trap": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(SketchError, match="not a readable checkpoint"):
        load_checkpoint(tmp_path / "evil.pt")
