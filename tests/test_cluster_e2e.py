"""Several Ray nodes on one machine (ray.cluster_utils.Cluster): placement across nodes, shared
results, a node lost mid-search; and the dashboard of a local run."""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pandas as pd
import pytest

from conftest import run_script, session_processes, started_script, write_space


@pytest.fixture
def three_node_cluster():
    from ray.cluster_utils import Cluster

    # 1 CPU each: a trial's two 0.9-CPU workers never fit on one node.
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "include_dashboard": True, "dashboard_host": "127.0.0.1"})
    workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    try:
        yield cluster, workers
    finally:
        cluster.shutdown()


def test_multi_node_search_survives_a_lost_node(tmp_path, demo_dir, three_node_cluster):
    cluster, workers = three_node_cluster
    space = write_space(tmp_path / "space.yaml", demo_dir, experiment="multinode", num_samples=1, max_epochs=3,
                        scheduler={"type": "none"}, resources={"workers": 2})
    shared_results = tmp_path / "shared-results"  # every node of this cluster reaches this folder
    with started_script("tune.py", "--space", str(space), "--results", str(shared_results),
                        "--address", cluster.address, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                        text=True) as driver:
        epochs_file = shared_results / "multinode" / "epochs.parquet"
        removed, deadline = False, time.monotonic() + 600
        while not removed and time.monotonic() < deadline and driver.poll() is None:
            if epochs_file.exists() and len(nodes := pd.read_parquet(epochs_file)["nodes"].dropna()):
                # The two workers sit on two of the three nodes, so at least one non-head node trains.
                doomed = next(node for node in workers if node.node_id[:8] in nodes.iloc[0])
                cluster.remove_node(doomed, allow_graceful=False)  # the node is lost mid-trial
                removed = time.time()
            time.sleep(0.5)
        output, _ = driver.communicate(timeout=900)
    assert removed, output[-3000:]
    assert driver.returncode == 0, output[-3000:]

    trials = pd.read_parquet(shared_results / "multinode" / "trials.parquet")
    assert len(trials) == 1 and (trials["status"] == "finished").all(), trials[["status", "error"]]
    nodes_used = {node for nodes in trials["node"] for node in nodes.split(",")}
    assert len(nodes_used) >= 2, nodes_used  # workers were placed on more than one node
    epochs = pd.read_parquet(epochs_file)
    assert all(len(nodes.split(",")) == 2 for nodes in epochs["nodes"].dropna())
    after = epochs[epochs["timestamp"] > removed + 1]
    assert len(after) and not after["nodes"].str.contains(doomed.node_id[:8]).any()  # retried on the nodes left


def test_local_dashboard_on_localhost_and_ray_ports_need_the_token_then_ctrl_c_and_resume(tmp_path, demo_dir):
    space = write_space(tmp_path / "space.yaml", demo_dir, experiment="dashboard", num_samples=1, max_epochs=2,
                        scheduler={"type": "none"})
    results = tmp_path / "results"
    with started_script("tune.py", "--space", str(space), "--results", str(results),
                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as driver:
        url = None
        for line in driver.stdout:
            if line.startswith("Ray dashboard: "):
                url = line.split(": ", 1)[1].strip()
                break
        assert url and url.startswith("http://127.0.0.1:"), url
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"{url}/api/version", timeout=30)
        assert refused.value.code in (401, 403)  # token authentication is on
        token = (Path.home() / ".ray" / "auth_token").read_text().strip()

        def dashboard_api(path: str):
            request = urllib.request.Request(f"{url}{path}", headers={"Authorization": f"Bearer {token}"})
            with urllib.request.urlopen(request, timeout=30) as response:
                return json.loads(response.read())

        assert "ray_version" in dashboard_api("/api/version")
        # Ray's own ports bind the node's address (ray.init turns 127.0.0.1 into it): the token guards them.
        gcs_address = session_gcs_address(driver.ray_tmpdir)
        intruder = subprocess.run(
            [sys.executable, "-c", f"import ray; ray.init(address={gcs_address!r})"], capture_output=True, text=True,
            timeout=120, env={**os.environ, "HOME": str(tmp_path), "RAY_AUTH_TOKEN": "0" * 32})
        assert intruder.returncode != 0 and "InvalidAuthToken" in intruder.stderr, intruder.stderr[-2000:]
        runs, deadline = [], time.monotonic() + 300
        while not runs and time.monotonic() < deadline and driver.poll() is None:
            try:  # the Train tab's source: an error until the first trial starts its Train run
                runs = dashboard_api("/api/train/v2/runs/v1")["train_runs"]
            except urllib.error.HTTPError:
                pass
            time.sleep(2)
        assert runs and runs[0]["name"] == "train", runs
        # The trial is still starting (two epochs to go): Ctrl-C saves the search for --resume.
        driver.send_signal(signal.SIGINT)
        output, _ = driver.communicate(timeout=300)
    assert driver.returncode == 130 and "interrupted; continue with --resume" in output, output[-3000:]
    assert "no trial reported" not in output and "Traceback" not in output, output[-3000:]
    assert pd.read_parquet(results / "dashboard" / "trials.parquet")["status"].tolist() == ["interrupted"]

    resumed = run_script("tune.py", "--space", str(space), "--results", str(results), "--resume")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert pd.read_parquet(results / "dashboard" / "trials.parquet")["status"].tolist() == ["finished"]
    assert pd.read_parquet(results / "dashboard" / "epochs.parquet")["epoch"].tolist() == [1, 2]


def session_gcs_address(ray_tmpdir: str) -> str:
    """The GCS address of the local Ray started under ``ray_tmpdir``, from its processes' arguments."""
    for arguments in session_processes(ray_tmpdir).values():
        for argument in arguments:
            if argument.startswith("--gcs-address="):
                return argument.split("=", 1)[1]
    raise AssertionError(f"no process of {ray_tmpdir} names its GCS address")
