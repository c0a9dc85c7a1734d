"""The behaviour of Ray beyond its public API that ray_jobs/ray_internals.py relies on: each test
fails when a Ray upgrade changes it (ARCHITECTURE.md, "Facts about Ray 2.60 the code relies on")."""

import glob
import os

import pytest

from ray_jobs.ray_internals import OwnRequest, local_ray_instances, unreadable_saved_state
from ray_jobs.tuning import DrawnTrials

pytestmark = pytest.mark.e2e


def test_ray_reuses_processes_for_equal_requests_and_saves_state_under_known_names(tmp_path):
    import ray
    from ray import tune

    def report_pid(config):  # defined here: Ray's workers cannot import the tests' modules
        tune.report({"pid": os.getpid(), "score": 1.0})

    assert local_ray_instances() == [], "another Ray instance runs on this machine"
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        assert local_ray_instances() == [ray.get_runtime_context().gcs_address]
        # Tune keeps one finished process when no pending trial asks for its request (the next
        # trial is drawn only once one ends: max_concurrent_trials): equal requests come first.
        own = [{"own": False}, {"own": False}, {"own": True}, {"own": True}]
        trainable = tune.with_resources(
            report_pid,
            lambda config: (
                OwnRequest([{"CPU": 0.5}])
                if config["own"]
                else tune.PlacementGroupFactory([{"CPU": 0.5}])
            ),
        )
        results = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(
                search_alg=DrawnTrials(own, metric="score", mode="max"),
                num_samples=4,
                max_concurrent_trials=1,
                reuse_actors=True,
            ),
            run_config=tune.RunConfig(name="exp", storage_path=str(tmp_path), verbose=0),
        ).fit()
        equal = [result.metrics["pid"] for result in results if not result.config["own"]]
        mine = [result.metrics["pid"] for result in results if result.config["own"]]
    finally:
        ray.shutdown()
    # The trials ran one at a time in the order drawn (trial ids are random: not that order).
    assert len(set(equal)) == 1, (
        "Tune no longer reuses a process for a trial with an equal resource request"
    )
    assert len({*equal, *mine}) == 3, (
        "a trial with a request of its own was given another's process"
    )

    folder = tmp_path / "exp"
    names = os.listdir(folder)
    assert unreadable_saved_state(names, lambda name: (folder / name).read_bytes()) is None, names


def test_ray_train_takes_reports_at_the_pace_ray_internals_names():
    """train_report_pace sets the variable Ray Train's controller polls reports by, which Train
    hands from the trial's process to its workers, and a worker waits on a queue of one report:
    left at Ray's default, no epoch of a trial would be shorter than 2 s."""
    import inspect

    from ray.train.v2._internal import constants
    from ray.train.v2._internal.execution.controller import controller
    from ray.train.v2._internal.execution.worker_group import worker

    from ray_jobs.ray_internals import TRAIN_REPORT_POLL, train_report_pace

    name, value = TRAIN_REPORT_POLL
    assert constants.HEALTH_CHECK_INTERVAL_S_ENV_VAR == name
    assert name in constants.ENV_VARS_TO_PROPAGATE
    assert "os.getenv(HEALTH_CHECK_INTERVAL_S_ENV_VAR" in inspect.getsource(controller)
    assert "result_queue=queue.Queue(maxsize=1)" in inspect.getsource(worker)
    assert float(value) < constants.DEFAULT_HEALTH_CHECK_INTERVAL_S
    assert train_report_pace() == {name: os.environ.get(name, value)}


def test_a_users_report_pace_wins(monkeypatch):
    from ray_jobs.ray_internals import TRAIN_REPORT_POLL
    from ray_jobs.trial import worker_env

    name, value = TRAIN_REPORT_POLL
    monkeypatch.delenv(name, raising=False)
    assert worker_env()[name] == value
    monkeypatch.setenv(name, "1.5")
    assert worker_env()[name] == "1.5"


def test_ray_keeps_the_latest_of_equally_scored_checkpoints(tmp_path):
    """results.best_epochs takes the latest of tied epochs because Ray's num_to_keep deletes the
    earlier of equal checkpoints first: in a TorchTrainer trial and in a trial's own process. The
    product's worker environment reaches the TorchTrainer's workers (Train propagates it)."""
    import pandas as pd
    import ray
    from ray import tune

    from ray_jobs.ray_internals import TRAIN_REPORT_POLL
    from ray_jobs.results import best_epochs
    from ray_jobs.space import Resources
    from ray_jobs.trial import make_trainable, worker_env
    from ray_jobs.tuning import retries_and_checkpoints

    val_accs = [0.5, 0.7, 0.6, 0.7, 0.65]

    def loop(config, session):  # defined here: Ray's workers cannot import the tests' modules
        import tempfile

        for epoch, val_acc in enumerate(val_accs, start=1):
            metrics = {
                "epoch": epoch,
                "val_acc": val_acc,
                "report_poll_s": float(os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", -1)),
            }
            if session.world_rank() != 0:
                session.report(metrics)
                continue
            with tempfile.TemporaryDirectory() as folder:
                open(os.path.join(folder, "epoch"), "w").write(str(epoch))
                session.report(metrics, checkpoint_folder=folder)

    assert local_ray_instances() == [], "another Ray instance runs on this machine"
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": worker_env()},  # as ray_jobs.cluster.connect starts Ray
    )
    try:
        trainable = make_trainable(
            loop,
            resources=Resources(workers=1, cpus_per_worker=0.5, head_cpus=0.5),
            keep_checkpoints=1,
            metric="val_acc",
            mode="max",
            train_config=lambda config: {"model": "test_resnet"},
            predicts_only=lambda config: config["in_process"],
        )
        results = tune.Tuner(
            trainable,
            param_space={"in_process": tune.grid_search([False, True])},
            tune_config=tune.TuneConfig(max_concurrent_trials=1),
            run_config=tune.RunConfig(
                name="exp",
                storage_path=str(tmp_path),
                verbose=0,
                **retries_and_checkpoints(
                    max_failures=0, keep_checkpoints=1, metric="val_acc", mode="max"
                ),
            ),
        ).fit()
    finally:
        ray.shutdown()
    for result in results:
        assert result.error is None, result.error
        if result.config["in_process"]:  # Tune's own checkpoints, in the trial's folder
            folders = glob.glob(os.path.join(result.path, "checkpoint_*"))
        else:  # Train V2's: their paths come in the forwarded metrics (ARCHITECTURE.md)
            folders = result.metrics_dataframe["checkpoint_path"].tolist()
            assert result.metrics["report_poll_s"] == float(TRAIN_REPORT_POLL[1])
        kept = {
            int(open(os.path.join(folder, "epoch")).read())
            for folder in folders
            if os.path.exists(os.path.join(folder, "epoch"))
        }
        assert 4 in kept and 2 not in kept, (
            f"Ray kept the checkpoints of epochs {sorted(kept)} of {val_accs} (num_to_keep 1): "
            "results.best_epochs must pick the one it keeps of tied epochs"
        )
    epochs = pd.DataFrame({"trial_id": "t", "epoch": [1, 2, 3, 4, 5], "val_acc": val_accs})
    assert best_epochs(epochs, metric="val_acc", mode="max")["epoch"].tolist() == [4]
