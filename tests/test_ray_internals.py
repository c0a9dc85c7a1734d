"""The behaviour of Ray beyond its public API that ray_jobs/ray_internals.py relies on: each test
fails when a Ray upgrade changes it (ARCHITECTURE.md, "Facts about Ray 2.60 the code relies on")."""

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
