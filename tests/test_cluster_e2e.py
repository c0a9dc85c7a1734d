"""Several Ray nodes on one machine (ray.cluster_utils.Cluster): placement across nodes, results in
a bucket as the only shared storage, a node lost mid-search; and the dashboard of a local run."""

import subprocess
import time

import pytest
from conftest import started_script, write_space

pytestmark = pytest.mark.e2e  # real commands on local Ray: the fast tier is pytest -m "not e2e"


@pytest.fixture
def three_node_cluster():
    from ray.cluster_utils import Cluster

    # 1 CPU each: a trial's two 0.9-CPU workers never fit on one node.
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "include_dashboard": True, "dashboard_host": "127.0.0.1"},
    )
    workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    try:
        yield cluster, workers
    finally:
        cluster.shutdown()


@pytest.fixture
def three_node_cluster_with_s3(s3, three_node_cluster):
    """The cluster started with the S3 server's settings in its environment, as each node of a
    real cluster has them (exported before `ray start`, or an instance role)."""
    return three_node_cluster


def test_multi_node_search_with_a_bucket_survives_a_lost_node(
    tmp_path, demo_dir, s3, three_node_cluster_with_s3
):
    """A node lost mid-trial, its training worker with it, as a preempted spot node: the trial
    restarts on the nodes left from its checkpoint and the search completes. The nodes share no
    folder: the results, Tune's state and the checkpoints live in a bucket of a real S3 server, so
    the retried trial's checkpoint comes from the bucket, not from the lost node's disk. (Ended
    trials freeing their workers: the quickstart's and tests/test_trial_kinds.py; a configuration
    that always fails: tests/test_trial_kinds.py.)"""
    cluster, workers = three_node_cluster_with_s3
    space = write_space(
        tmp_path / "space.yaml",
        demo_dir,
        experiment="multinode",
        num_samples=1,
        max_epochs=3,
        scheduler={"type": "none"},
        resources={"workers": 2},
    )
    with started_script(
        "tune.py",
        "--space",
        str(space),
        "--results",
        s3.uri("clusters"),
        "--address",
        cluster.address,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=tmp_path,
    ) as driver:
        epochs_file = "clusters/multinode/epochs.parquet"
        removed, deadline = False, time.monotonic() + 600
        while not removed and time.monotonic() < deadline and driver.poll() is None:
            if s3.exists(epochs_file) and len(nodes := s3.parquet(epochs_file)["nodes"].dropna()):
                # The two workers sit on two of the three nodes, so at least one non-head node
                # trains.
                doomed = next(node for node in workers if node.node_id[:8] in nodes.iloc[0])
                cluster.remove_node(doomed, allow_graceful=False)  # the node is lost mid-trial
                removed = time.time()
            time.sleep(0.5)
        output, _ = driver.communicate(timeout=900)
    assert removed, output[-3000:]
    assert driver.returncode == 0, output[-3000:]

    trials = s3.parquet("clusters/multinode/trials.parquet")
    assert len(trials) == 1 and (trials["status"] == "finished").all(), trials[["status", "error"]]
    nodes_used = {node for nodes in trials["node"] for node in nodes.split(",")}
    assert len(nodes_used) >= 2, nodes_used  # workers were placed on more than one node
    epochs = s3.parquet(epochs_file)
    assert all(len(nodes.split(",")) == 2 for nodes in epochs["nodes"].dropna())
    table = epochs[["epoch", "started_at_epoch", "nodes", "timestamp"]]
    # The lost node's worker may still report the epoch it was in before it notices its raylet is
    # gone, so the retry is told by its rows, not by a time after the removal: the rows of the
    # worker group that started from a checkpoint.
    first_run, retry = (
        epochs[epochs["started_at_epoch"] == 0],
        epochs[epochs["started_at_epoch"] > 0],
    )
    assert first_run["nodes"].str.contains(doomed.node_id[:8]).all(), table
    assert len(retry) and (retry["timestamp"] > removed).all(), table  # it was retried
    assert not retry["nodes"].str.contains(doomed.node_id[:8]).any(), table  # on the nodes left
    # ... from its last checkpoint, not from the start: every epoch once, in order.
    assert epochs["epoch"].tolist() == list(range(1, len(epochs) + 1)), table
    assert retry["started_at_epoch"].iloc[0] == len(first_run), table
    # Its checkpoints, the one it restarted from among them, are the bucket's.
    checkpoints = epochs["checkpoint_path"].dropna()
    assert len(checkpoints) and checkpoints.str.startswith(s3.uri("clusters/multinode/tune/")).all()
    assert s3.exists("clusters/multinode/best.json") and s3.exists(
        "clusters/multinode/tune/tuner.pkl"
    )
    assert list(tmp_path.iterdir()) == [tmp_path / "space.yaml"]  # nothing of it on a local disk


def test_local_dashboard_on_localhost_and_ray_ports_need_the_token(finished_search):
    dashboard = finished_search["dashboard"]
    assert dashboard["url"].startswith("http://127.0.0.1:"), dashboard["url"]
    assert dashboard["without_token"] in (401, 403)  # token authentication is on
    assert "ray_version" in dashboard["version"]
    # Ray's own ports bind the node's address (ray.init turns 127.0.0.1 into it): the token guards
    # them.
    intruder = dashboard["intruder"]
    assert intruder.returncode != 0 and "InvalidAuthToken" in intruder.stderr, intruder.stderr[
        -2000:
    ]
    assert dashboard["train_runs"][0]["name"] == "train", dashboard["train_runs"]
