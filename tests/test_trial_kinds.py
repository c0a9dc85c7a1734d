"""One search, two kinds of trial: heads on cached features in reused Ray Tune processes, everything
else in Ray Train workers; both stopped by ASHA, retried from their checkpoints, refitted."""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import (
    QUICK_TRAINING,
    run_script,
    started_script,
    wait_for,
    watch_worker_release,
    write_space,
)

pytestmark = pytest.mark.e2e  # real commands on local Ray: the fast tier is pytest -m "not e2e"

MAX_EPOCHS = 4


@pytest.fixture
def one_node_cluster():
    """A local Ray node the test can question after the search (its state API lists dead actors)."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 2, "include_dashboard": True, "dashboard_host": "127.0.0.1"},
    )
    try:
        yield cluster
    finally:
        cluster.shutdown()


@pytest.fixture
def trained_backbone(demo_dir, tmp_path) -> Path:
    """test_resnet's backbone trained briefly on the demo data: features a head can use."""
    import torch

    from sketch_core.config import TrainConfig
    from sketch_core.engine import TrainingRun

    run = TrainingRun(
        TrainConfig.from_dict({**QUICK_TRAINING, "data_dir": str(demo_dir), "epochs": 3})
    )
    list(run.epochs())
    torch.save(run.model.backbone.state_dict(), tmp_path / "backbone.pth")
    return tmp_path / "backbone.pth"


def test_only_head_only_trials_can_share_a_trial_process():
    """Ray Tune reuses a process for a trial whose request equals the last one's: every head-only
    trial asks for the same share; no TorchTrainer trial's request equals another's, even for the
    same configuration (ray-project/ray#29268), and a pickled one (in Tune's saved state) keeps
    it."""
    import pickle

    from ray_jobs.space import Resources
    from ray_jobs.trial import trial_request
    from sketch_core.config import TrainConfig

    resources = Resources(
        workers=2, cpus_per_worker=4, gpus_per_worker=1, head_cpus=1, head_gpus=0.25
    )
    head = {**TrainConfig().to_dict(), "freeze": "head"}
    first, second = trial_request(head, resources), trial_request({**head, "lr": 0.5}, resources)
    assert first == second and hash(first) == hash(second)
    assert first.required_resources == {"CPU": 1.0, "GPU": 0.25}
    tuned = {**head, "freeze": "none"}
    one, other = trial_request(tuned, resources), trial_request(tuned, resources)
    assert one != other and one != first and one.required_resources == {"CPU": Resources.TRIAL_CPUS}
    restored = pickle.loads(pickle.dumps(one))
    assert restored == one and hash(restored) == hash(one) and restored != other
    assert trial_request({**head, "mixup_alpha": 0.4}, resources) != first  # Mixup trains on images


def results_of_running_head_trials(tune_dir: Path, from_epoch: int = 1) -> list[dict]:
    """The last result of every head-only trial at a learning rate that trains (ASHA lets it go on),
    from epoch ``from_epoch`` and before its last, from Tune's own result.json files (written as
    each epoch is reported)."""
    running = []
    for result_file in tune_dir.glob("*/result.json"):
        lines = result_file.read_text().splitlines()
        if lines:
            last = json.loads(lines[-1])
            if (
                last.get("feature_cache") == 1.0
                and last["config"]["lr"] > 1e-3
                and from_epoch <= last["epoch"] < MAX_EPOCHS
            ):
                running.append(last)
    return running


def freeze_a_head_trial_mid_run(tune_dir: Path, driver, from_epoch: int = 1) -> dict:
    """SIGSTOP the process of a head-only trial that has reported an epoch (so it has a checkpoint)
    and not its last; its last result. The process is frozen first, then checked again: a head
    trial's epochs take milliseconds, and one that ended meanwhile is let go on."""
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and driver.poll() is None:
        for seen in results_of_running_head_trials(tune_dir, from_epoch):
            pid = int(seen["pids"])
            os.kill(pid, signal.SIGSTOP)
            still = [
                r
                for r in results_of_running_head_trials(tune_dir, from_epoch)
                if r["trial_id"] == seen["trial_id"]
            ]
            if still and int(still[0]["pids"]) == pid:
                return still[0]
            os.kill(pid, signal.SIGCONT)
        time.sleep(0.01)
    pytest.fail("no head-only trial was seen between two epochs")


def kill_a_head_trial_mid_run(tune_dir: Path, driver) -> dict:
    """SIGKILL the process of a head-only trial between two epochs, from its second on; its last
    result."""
    frozen = freeze_a_head_trial_mid_run(tune_dir, driver, from_epoch=2)
    os.kill(int(frozen["pids"]), signal.SIGKILL)
    return frozen


def saved_state_uploaded(ray_tmpdir: str, tune_dir: Path) -> bool:
    """Whether the last state Tune saved of the search is in its results folder whole: Tune writes
    each save (its state files, each trial's result.json, ...) into a staging folder of the driver's
    Ray session, then uploads that folder file by file in the background. Until every file there is
    in ``tune_dir`` with the same bytes, an upload is under way (or about to start)."""
    found = Path(ray_tmpdir).glob("ray/session_*/artifacts/*/tune/driver_artifacts")
    staging = sorted({path.resolve() for path in found})  # session_latest links to the session
    assert len(staging) <= 1, staging  # one search, one session
    files = [path for path in staging[0].rglob("*") if path.is_file()] if staging else []
    return bool(files) and all(
        (tune_dir / path.relative_to(staging[0])).is_file()
        and (tune_dir / path.relative_to(staging[0])).read_bytes() == path.read_bytes()
        for path in files
    )


def actor_pids(address: str) -> dict[str, set[int]]:
    """Class name to PIDs of every actor the cluster ran, ended ones included."""
    import ray
    from ray.util.state import list_actors

    ray.init(address=address, log_to_driver=False)
    try:
        pids: dict[str, set[int]] = {}
        for actor in list_actors(detail=True, limit=10_000, raise_on_missing_output=False):
            pids.setdefault(actor.class_name, set()).add(actor.pid)
        return pids
    finally:
        ray.shutdown()


def test_mixed_search_runs_head_trials_in_reused_tune_processes_and_the_rest_in_train_workers(
    tmp_path, demo_dir, one_node_cluster, trained_backbone
):
    # Grid order (the first key varies fastest): head and fine-tuning at 2e-2, which wrecks the
    # pretrained features in fine-tuning, so ASHA stops that trial behind the head's, early, while
    # the search goes on; then both at 5e-3; then both at 1e-7, which leaves the head at its random
    # start, below every head trial (and the median of all four before it) at the first rung. (A
    # fine-tuning trial at 1e-7 keeps the backbone's features whole and does well.)
    space = write_space(
        tmp_path / "space.yaml",
        demo_dir,
        experiment="mixed",
        num_samples=1,
        max_epochs=MAX_EPOCHS,
        model={"checkpoint_file": str(trained_backbone)},
        search={"searcher": "grid", "max_concurrent": 2, "max_failures": 1},
        scheduler={"grace_period": 1, "reduction_factor": 2},
        # As the shipped GPU spaces run: loader workers (for the feature cache's encoding too) and
        # augmentation (4 cached views for the head trials).
        fixed={"batch_size": 4, "num_workers": 2, "augment": "light"},
        space={"freeze": {"grid": ["head", "none"]}, "lr": {"grid": [2.0e-2, 5.0e-3, 1.0e-7]}},
    )
    results = tmp_path / "results"
    address = ["--results", str(results), "--address", one_node_cluster.address]
    log = tmp_path / "tune.log"
    with (
        log.open("w") as output,
        started_script(
            "tune.py", "--space", str(space), *address, stdout=output, stderr=subprocess.STDOUT
        ) as driver,
    ):
        killed = kill_a_head_trial_mid_run(results / "mixed" / "tune", driver)
        released = watch_worker_release(driver, results / "mixed", timeout=900)
    assert driver.returncode == 0, log.read_text()[-3000:]

    trials = pd.read_parquet(results / "mixed" / "trials.parquet").set_index("trial_id")
    epochs = pd.read_parquet(results / "mixed" / "epochs.parquet")
    head = trials[trials["config.freeze"] == "head"]
    tuned = trials[trials["config.freeze"] == "none"]
    assert (
        len(head) == len(tuned) == 3
        and (head["feature_cache"] == 1).all()
        and (tuned["feature_cache"] == 0).all()
    )
    assert set(trials["status"]) <= {"finished", "stopped_early"}, trials[["status", "error"]]
    # ASHA stopped trials of each kind (the head at 1e-7, fine-tuning at 2e-2, at least).
    for kind in (head, tuned):
        assert (kind["status"] == "stopped_early").any(), kind[
            ["config.lr", "status", "best_val_acc"]
        ]
    # A stopped fine-tuning trial's Train workers ended while the search went on (its process was
    # not kept for reuse: it would still hold them), and no ended trial's workers outlived it.
    stopped = set(tuned.index[tuned["status"] == "stopped_early"])
    assert stopped & {trial for trial, seen in released.items() if seen["after_s"] is not None}, (
        released
    )
    assert all(seen["after_s"] is not None for seen in released.values()), released

    # The killed head trial went on from its checkpoint, in another process, to its last epoch.
    # Tune writes an epoch's result.json, then asks the trial's process for that epoch's checkpoint
    # and lets the trial go on only once it has it: a process killed after result.json showed epoch
    # e may not have handed over e's checkpoint, but it had handed over e - 1's.
    attempts = epochs[epochs["trial_id"] == killed["trial_id"]].sort_values("epoch")
    assert attempts["epoch"].tolist() == list(range(1, len(attempts) + 1))
    after_kill = attempts[attempts["epoch"] > killed["epoch"]]
    resumed_from = after_kill["started_at_epoch"]
    assert len(after_kill) and resumed_from.between(killed["epoch"] - 1, killed["epoch"]).all(), (
        attempts
    )
    assert set(after_kill["pids"].astype(int)) != {int(killed["pids"])}
    assert trials.loc[killed["trial_id"], "status"] in ("finished", "stopped_early")  # not error

    # Head trials ran in Tune's trial processes (ImplicitFunc), one reused for both: no Train
    # worker. Fine-tuning trials trained in RayTrainWorker processes.
    ran = actor_pids(one_node_cluster.address)
    head_pids = {int(pid) for pid in epochs.loc[epochs["trial_id"].isin(head.index), "pids"]}
    tuned_pids = {
        int(pid)
        for pids in epochs.loc[epochs["trial_id"].isin(tuned.index), "pids"]
        for pid in str(pids).split(",")
    }
    assert head_pids <= ran["ImplicitFunc"] and not head_pids & ran.get("RayTrainWorker", set()), (
        head_pids,
        ran,
    )
    assert tuned_pids <= ran["RayTrainWorker"], (tuned_pids, ran)
    pid_of = epochs.groupby("trial_id")["pids"].last().astype(str)
    assert len({pid_of[trial] for trial in head.index}) < len(head), (
        "no head trial reused a process"
    )
    # The head trials checkpoint the head only: a few kilobytes, not the backbone.
    checkpoints = list((results / "mixed" / "tune").glob("*/checkpoint_*/state.pt"))
    assert (
        checkpoints
        and max(path.stat().st_size for path in checkpoints) < trained_backbone.stat().st_size / 4
    )

    # Every epoch of either kind has its checkpoint in the tables (Tune's or Ray Train's, in the
    # trial's folder; each keeps the trial's best keep_checkpoints on disk), and best.json names
    # one.
    assert epochs["checkpoint_path"].str.startswith(str(results / "mixed" / "tune")).all(), epochs
    best = json.loads((results / "mixed" / "best.json").read_text())
    assert best["checkpoint"] in set(epochs["checkpoint_path"]), best

    # The best trial is refitted as the kind it is: a head-only one without Ray Train.
    train_workers_before = len(actor_pids(one_node_cluster.address).get("RayTrainWorker", ()))
    refit = run_script("final_fit.py", "--best", *address)
    assert refit.returncode == 0, refit.stdout[-3000:] + refit.stderr[-3000:]
    fit = json.loads(next((results / "mixed").glob("final/fit-*/fit.json")).read_text())
    assert fit["models"][0]["source_trial"] == best["trial_id"]
    assert fit["test_accuracy"]["ensemble"] > 0.25, fit["test_accuracy"]  # twice chance
    started_train_workers = (
        len(actor_pids(one_node_cluster.address).get("RayTrainWorker", ())) > train_workers_before
    )
    assert started_train_workers == (best["config"]["freeze"] != "head"), best["config"]


def test_a_head_only_search_killed_mid_trial_resumes_from_its_checkpoints(tmp_path, demo_dir):
    """kill -9 of the driver while a head-only trial is between two epochs, then --resume: the trial
    goes on from its last Tune checkpoint, and no row written before the kill is lost. A
    configuration that fails in every attempt is recorded as an error, and the search completes."""
    space = write_space(
        tmp_path / "space.yaml",
        demo_dir,
        experiment="heads",
        num_samples=1,
        max_epochs=MAX_EPOCHS,
        search={"searcher": "grid", "max_concurrent": 1, "max_failures": 1},
        scheduler={"type": "none"},
        fixed={"freeze": "head", "num_workers": 0, "augment": "light", "lr": 2.0e-2},
        # A batch of 512 is more than the 256 training images: fails every time.
        space={"batch_size": {"grid": [4, 512]}},
    )
    document = yaml.safe_load(space.read_text())
    del document["fixed"]["batch_size"]  # write_space's default
    space.write_text(yaml.safe_dump(document))
    results = tmp_path / "results"
    command = ("tune.py", "--space", str(space), "--results", str(results))
    # Tune uploads its saved state in the background, file by file: once per trial's second
    # checkpoint (keep_checkpoints 2) and every 10 s. A kill -9 amid an upload can cut a file short,
    # which --resume refuses (below). The 10 s uploads are put off here, and the kill waits for the
    # last upload to end: the trial is frozen, so none starts meanwhile.
    with started_script(
        *command,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={"TUNE_GLOBAL_CHECKPOINT_S": "3600"},
    ) as driver:
        # From epoch 2: Tune's saved state has caught up with at least one of its checkpoints.
        frozen = freeze_a_head_trial_mid_run(results / "heads" / "tune", driver, from_epoch=2)
        wait_for(
            lambda: saved_state_uploaded(driver.ray_tmpdir, results / "heads" / "tune"),
            "the upload of Tune's last saved state",
            driver,
            timeout=120,
            interval=0.1,
        )
        driver.send_signal(
            signal.SIGKILL
        )  # kill -9, a lost SSH session, while the trial is mid-run
        driver.wait()
        os.kill(int(frozen["pids"]), signal.SIGKILL)  # a frozen process would never see its Ray go
    # Leaving the block stopped what the killed driver left of its local Ray.
    before = pd.read_parquet(results / "heads" / "epochs.parquet")

    resumed = run_script(*command, "--resume")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    trials = pd.read_parquet(results / "heads" / "trials.parquet").set_index("config.batch_size")
    epochs = pd.read_parquet(results / "heads" / "epochs.parquet")
    assert (
        len(trials) == 2
        and trials.loc[4, "status"] == "finished"
        and trials.loc[4, "feature_cache"] == 1
    )
    assert (
        trials.loc[512, "status"] == "error"
        and "batch_size: 512 per worker exceeds" in trials.loc[512, "error"]
    )
    kept = before.merge(epochs, on=["trial_id", "epoch"], how="left", suffixes=("", "_after"))
    assert kept["val_acc_after"].notna().all(), "rows written before the kill were lost"
    attempts = epochs[epochs["trial_id"] == frozen["trial_id"]].sort_values("epoch")
    # (An epoch reported less than 2 s after the tables were last written may be missing from them:
    # they are written at most every 2 s, and the trial goes on after the checkpoint of that epoch.)
    assert attempts["epoch"].is_unique and attempts["epoch"].max() == MAX_EPOCHS, attempts
    after = attempts[attempts["epoch"] > frozen["epoch"]]
    assert len(after) and (after["started_at_epoch"] > 0).all(), (
        attempts
    )  # from a checkpoint, not from scratch

    # A kill -9 amid Tune's upload of its state can leave a file of it cut short. Tune would restore
    # nothing from it and start the search again; --resume says so instead, and changes nothing.
    tables = {
        name: (results / "heads" / name).read_bytes()
        for name in ("trials.parquet", "epochs.parquet")
    }
    searcher_state = max((results / "heads" / "tune").glob("searcher-state-*.pkl"))
    searcher_state.write_bytes(searcher_state.read_bytes()[:40])
    refused = run_script(*command, "--resume")
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr[-3000:]
    assert refused.stderr.strip() == (
        f"error: {results / 'heads' / 'tune'}: cannot resume: {searcher_state.name} is "
        "damaged (UnpicklingError), as when the driver is killed while Ray Tune saves "
        "the search; start a new search that learns from this one's trials: --name NEW "
        "--warm-start heads"
    ), refused.stderr
    assert tables == {name: (results / "heads" / name).read_bytes() for name in tables}
