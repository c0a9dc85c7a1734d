"""Faults survived, nothing lost: ended trials free their workers, an interrupted write keeps the
last whole version, a checkpoint loads weights only. (A training worker lost with its node:
tests/test_cluster_e2e.py.)"""

import signal
import subprocess
import sys

import pytest
import torch
from conftest import REPO_ROOT

from sketch_core.engine import load_checkpoint
from sketch_core.errors import SketchError


def test_ended_trials_free_their_workers_while_the_search_goes_on(finished_search):
    """(An ASHA-stopped trial's workers: tests/test_trial_kinds.py.)"""
    released = finished_search["released"]  # watched while the shared search ran
    assert released, "no fine-tuning trial ended while the quickstart search went on"
    assert all(trial["after_s"] is not None for trial in released.values()), (
        f"workers outlived their trial: {released}"
    )


PAYLOAD_SIZE = 20_000_000
# Writes table.bin over and over, "a" then "b" then "a"..., and prints the fill after each write:
# the next write starts at once, so a kill right after a line lands after a whole replacement and
# most likely amid the next.
WRITER = """
import sys
sys.path.insert(0, sys.argv[1])
from ray_jobs.results import ResultsStore
store = ResultsStore(sys.argv[2], "exp")
while True:
    for fill in ("a", "b"):
        store.write_bytes("table.bin", fill.encode() * int(sys.argv[3]))
        print(fill, flush=True)
"""


def test_a_killed_writer_leaves_a_whole_version(tmp_path):
    from ray_jobs.results import ResultsStore

    store = ResultsStore(str(tmp_path), "exp")
    store.write_bytes("table.bin", b"x" * PAYLOAD_SIZE)
    for writes in (1, 2, 3):  # the kill after the first, second, third whole write
        writer = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(REPO_ROOT), str(tmp_path), str(PAYLOAD_SIZE)],
            stdout=subprocess.PIPE,
            text=True,
        )
        written = [writer.stdout.readline().strip() for _ in range(writes)]
        writer.send_signal(signal.SIGKILL)
        writer.wait()
        writer.stdout.close()
        assert written == ["a", "b", "a"][:writes], written
        content = store.read_bytes("table.bin")
        # The last whole write, or the one after it if that ended before the kill: never the
        # earlier file, nor a mix.
        assert content in (b"a" * PAYLOAD_SIZE, b"b" * PAYLOAD_SIZE), (
            "a half-written file replaced the last one, or the writes never replaced it"
        )
        store.write_bytes("table.bin", b"x" * PAYLOAD_SIZE)


def test_checkpoints_load_weights_only(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("code ran while loading",))

    torch.save({"model": {}, "trap": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(SketchError, match="not a readable checkpoint"):
        load_checkpoint(tmp_path / "evil.pt")


def test_a_search_state_that_tune_cannot_restore_is_refused_before_resuming(tmp_path):
    """Tune uploads its state files one by one; after a kill -9 amid an upload, one may be cut short
    or missing, and Tune would silently start the search again. The newest file of each kind counts,
    as Tune reads the newest. (The user's path, tune.py --resume: tests/test_trial_kinds.py.)"""
    import json
    import pickle

    from ray_jobs.results import ResultsStore
    from ray_jobs.tuning import check_saved_state

    store = ResultsStore(str(tmp_path), "exp")
    store.write_bytes(
        "tune/experiment_state-2026-01-01_00-00-00.json", b"{truncated"
    )  # an older session's
    store.write_bytes(
        "tune/experiment_state-2026-01-02_00-00-00.json", json.dumps({"trial_data": []}).encode()
    )
    store.write_bytes(
        "tune/search_gen_state-2026-01-02_00-00-00.json", pickle.dumps({"counter": 1})
    )
    store.write_bytes(
        "tune/searcher-state-2026-01-02_00-00-00.pkl", pickle.dumps({"handed_out": 1})
    )
    check_saved_state(store)

    store.write_bytes(
        "tune/experiment_state-2026-01-02_00-00-00.json", b'{"trial_data": [["{\\"trainable'
    )
    with pytest.raises(
        SketchError,
        match=r"cannot resume: experiment_state-2026-01-02_00-00-00.json is damaged "
        r"\(JSONDecodeError\).*--warm-start exp$",
    ):
        check_saved_state(store)
    store.write_bytes("tune/experiment_state-2026-01-02_00-00-00.json", b"{}")
    (tmp_path / "exp" / "tune" / "search_gen_state-2026-01-02_00-00-00.json").unlink()
    with pytest.raises(SketchError, match=r"cannot resume: no search_gen_state-\*.json,"):
        check_saved_state(store)
