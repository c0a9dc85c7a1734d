"""Offline checks of cluster.yaml, the Ray cluster launcher config used by `ray up`.

Schema validation runs the two steps `ray up` takes before it contacts AWS
(ray/autoscaler/_private/commands.py, _bootstrap_config). prepare_config merges the file key by key
over Ray's bundled aws/defaults.yaml (a local file), prepends setup_commands to the head and worker
setup lists and fills each node type's min/max_workers. validate_config checks the result against
ray/autoscaler/ray-schema.json plus cross-field rules (head_node_type is a node type, the sum of
min_workers fits under max_workers). The steps `ray up` runs next need AWS (instance-type resource
detection, then bootstrap_aws: IAM, key pair, subnets, security group, AMI) and are not called here;
the `offline` fixture makes any network use fail the test.
"""

import copy
import re
import socket
from pathlib import Path

import pytest
import ray
import yaml

from ray_jobs.ray_internals import default_inbound_rules, prepare_cluster_config

REPO = Path(__file__).resolve().parents[1]
CLUSTER_YAML = REPO / "cluster.yaml"
GPU_WORKER = "gpu_worker"
REPO_ON_NODE = "~/sketch-hpo"
EIGHT_GPU_BLOCK_START = "  # gpu_worker_8x:"

# Key names whose value would be a credential.
SECRET_KEY = re.compile(r"secret|password|passwd|token|access_key", re.IGNORECASE)
# Text that is, or hands over, a credential: in any parsed value and in the raw file (comments too).
SECRET_TEXT = {
    "an AWS access key id": re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),
    "an AWS secret key setting": re.compile(r"aws_secret_access_key", re.IGNORECASE),
    "a private key block": re.compile(r"-----BEGIN"),
    "a secret, password or token given a value": re.compile(
        r"\b\w*(?:secret|password|passwd|token)\w*\s*[:=]\s*\S", re.IGNORECASE
    ),
}


@pytest.fixture
def offline(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("cluster config validation tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


@pytest.fixture(scope="module")
def raw_text():
    return CLUSTER_YAML.read_text()


@pytest.fixture(scope="module")
def config(raw_text):
    return yaml.safe_load(raw_text)


@pytest.fixture
def prepared(config, offline):
    return prepare_cluster_config(copy.deepcopy(config))


def node_types(config):
    return config["available_node_types"]


def with_eight_gpu_block_uncommented(raw_text):
    lines = raw_text.splitlines()
    start = lines.index(EIGHT_GPU_BLOCK_START)
    end = start + 1
    while lines[end].startswith("  #   "):
        end += 1
    lines[start:end] = [line.replace("# ", "", 1) for line in lines[start:end]]
    return yaml.safe_load("\n".join(lines))


def walk(value, path="cluster.yaml"):
    """Yields (path, key, value) for every mapping entry and (path, None, value) for list items."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield path, key, item
            yield from walk(item, f"{path}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield f"{path}[{index}]", None, item
            yield from walk(item, f"{path}[{index}]")


def is_ssh_only(rule):
    return (
        rule.get("IpProtocol") == "tcp" and rule.get("FromPort") == 22 and rule.get("ToPort") == 22
    )


def test_passes_ray_schema_validation(config, offline):
    prepare_cluster_config(copy.deepcopy(config))  # raises on what `ray up` would refuse


def test_every_command_list_is_set_in_the_file(config):
    for key in (
        "setup_commands",
        "head_setup_commands",
        "worker_setup_commands",
        "head_start_ray_commands",
        "worker_start_ray_commands",
    ):
        assert key in config, (
            f"cluster.yaml does not set {key}: prepare_config then takes it from Ray's AWS "
            "defaults.yaml (a nightly Ray wheel install, a dashboard on 0.0.0.0)"
        )


def test_declared_inbound_rules_open_only_ssh(config):
    declared = config["provider"].get("security_group", {}).get("IpPermissions", [])
    wrong = [rule for rule in declared if not is_ssh_only(rule)]
    assert not wrong, (
        f"provider.security_group.IpPermissions opens more than tcp 22: {wrong}; "
        "the dashboard must be reached through `ray dashboard cluster.yaml`"
    )


def test_security_group_ray_creates_admits_outsiders_only_on_ssh(config):
    # Ray authorizes these rules on the group it creates for node types without SecurityGroupIds;
    # a group named in SecurityGroupIds is used as is and cannot be checked from the file.
    cluster_group = "sg-cluster"
    declared = config["provider"].get("security_group", {}).get("IpPermissions", [])
    rules = default_inbound_rules(cluster_group, declared)
    from_outside = [
        rule
        for rule in rules
        if rule.get("IpRanges")
        or rule.get("Ipv6Ranges")
        or rule.get("PrefixListIds")
        or any(pair.get("GroupId") != cluster_group for pair in rule.get("UserIdGroupPairs", []))
    ]
    assert from_outside, "no SSH rule found in the security group rules Ray would create"
    wrong = [rule for rule in from_outside if not is_ssh_only(rule)]
    assert not wrong, (
        f"the cluster's security group would admit outside traffic beyond tcp 22: {wrong}"
    )


def test_no_credentials_in_parsed_values(config):
    found = []
    for path, key, value in walk(config):
        if isinstance(key, str) and SECRET_KEY.search(key) and value not in (None, "", [], {}):
            found.append(f"{path}.{key} has a value")
        for text in (key, value):
            if isinstance(text, str):
                found += [
                    f"{path}: {what} in {text!r}"
                    for what, pattern in SECRET_TEXT.items()
                    if pattern.search(text)
                ]
    assert not found, "cluster.yaml holds credentials (use the instance's IAM role): " + "; ".join(
        found
    )


def test_no_credentials_in_raw_text(raw_text):
    found = [
        f"line {number}: {what}"
        for number, line in enumerate(raw_text.splitlines(), start=1)
        for what, pattern in SECRET_TEXT.items()
        if pattern.search(line)
    ]
    assert not found, "cluster.yaml text holds credentials (comments count too): " + "; ".join(
        found
    )


def test_dashboard_listens_on_localhost_only(prepared):
    head_starts = [cmd for cmd in prepared["head_start_ray_commands"] if "ray start --head" in cmd]
    assert len(head_starts) == 1, f"expected one `ray start --head` command, got {head_starts}"
    hosts = re.findall(r"--dashboard-host[= ](\S+)", head_starts[0])
    assert hosts == ["127.0.0.1"], (
        f"the head starts the dashboard with --dashboard-host {hosts or 'unset'}; it must be "
        "--dashboard-host=127.0.0.1 so it is only reachable through `ray dashboard`'s SSH tunnel"
    )


def test_every_node_type_has_an_iam_instance_profile(config):
    profiles = {
        name: node_type["node_config"].get("IamInstanceProfile", {})
        for name, node_type in node_types(config).items()
    }
    missing = [
        name
        for name, profile in profiles.items()
        if not (profile.get("Name") or profile.get("Arn"))
    ]
    assert not missing, (
        f"node types without node_config.IamInstanceProfile (Name or Arn): {missing}; "
        "nodes must take AWS credentials from their instance role"
    )


def test_every_node_type_sets_an_explicit_ami(config):
    wrong = [
        name
        for name, node_type in node_types(config).items()
        if node_type["node_config"].get("ImageId", "").lower() in ("", "latest_dlami")
    ]
    assert not wrong, (
        f"node types without an explicit ImageId: {wrong}; Ray would substitute its old "
        "Ubuntu 18.04 / CUDA 11.2 Deep Learning AMI"
    )


def test_gpu_workers_scale_from_zero_and_declare_gpus(config):
    assert GPU_WORKER in node_types(config), f"no node type named {GPU_WORKER!r}"
    gpu_worker = node_types(config)[GPU_WORKER]
    assert gpu_worker.get("min_workers") == 0, (
        f"{GPU_WORKER}.min_workers is {gpu_worker.get('min_workers')}; it must be 0 so no GPU node "
        "runs while no trial waits"
    )
    assert gpu_worker["resources"].get("GPU", 0) > 0, f"{GPU_WORKER}.resources declares no GPU"
    assert gpu_worker["resources"].get("CPU", 0) > 0, f"{GPU_WORKER}.resources declares no CPU"


def test_head_runs_no_trials(config):
    head = node_types(config)[config["head_node_type"]]
    assert head["resources"].get("GPU") == 0, "the head node type must declare GPU: 0"
    assert head["resources"].get("CPU") == 0, (
        f"the head advertises CPU {head['resources'].get('CPU')}; "
        "with CPU 0 no trial lands on the head"
    )


def test_eight_gpu_alternative_is_valid_once_uncommented(raw_text, offline):
    config = with_eight_gpu_block_uncommented(raw_text)
    prepare_cluster_config(config)
    eight = node_types(config)["gpu_worker_8x"]
    assert eight["resources"].get("GPU") == 8, "the 8-GPU alternative must declare GPU: 8"
    assert eight.get("min_workers") == 0, "the 8-GPU alternative must have min_workers: 0"
    assert eight["node_config"].get("IamInstanceProfile"), (
        "the 8-GPU alternative lacks an IamInstanceProfile"
    )


def test_setup_installs_the_synced_requirements(config, prepared):
    assert config["file_mounts"].get(REPO_ON_NODE) == ".", (
        f"file_mounts must sync the repository ('.') to {REPO_ON_NODE}"
    )
    for key in ("head_setup_commands", "worker_setup_commands"):
        assert any(
            "pip install" in cmd and f"-r {REPO_ON_NODE}/requirements.txt" in cmd
            for cmd in prepared[key]
        ), (
            f"{key} (after merging setup_commands) never runs "
            f"pip install -r {REPO_ON_NODE}/requirements.txt"
        )


def test_rsync_skips_results_data_and_git(config):
    excluded = {pattern.strip("/") for pattern in config.get("rsync_exclude", [])}
    missing = {"results", "data", ".git"} - excluded
    assert not missing, f"rsync_exclude lacks {sorted(missing)}; they would be copied to every node"


def test_requirements_pin_the_local_ray_version():
    requirements = REPO / "requirements.txt"
    if not requirements.exists():
        pytest.skip("requirements.txt does not exist yet")
    pins = re.findall(r"^ray(?:\[[^\]]*\])?==(\S+)", requirements.read_text(), flags=re.MULTILINE)
    assert pins == [ray.__version__], (
        f"requirements.txt pins ray {pins or 'nowhere'}; the cluster must run the Ray version "
        f"`ray up` runs with here ({ray.__version__})"
    )
