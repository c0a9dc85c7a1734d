"""Faults survived, nothing lost: ended trials free their workers, an interrupted write keeps the
last whole version, a checkpoint loads weights only. (A training worker lost with its node:
tests/test_cluster_e2e.py.)"""

import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO_ROOT
from sketch_core.engine import load_checkpoint
from sketch_core.errors import SketchError


def test_ended_trials_free_their_workers_while_the_search_goes_on(finished_search):
    """(An ASHA-stopped trial's workers: tests/test_trial_kinds.py.)"""
    released = finished_search["released"]  # watched while the shared search ran
    assert released, "no fine-tuning trial ended while the quickstart search went on"
    assert all(trial["after_s"] is not None for trial in released.values()), f"workers outlived their trial: {released}"


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
