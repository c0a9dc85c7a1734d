"""Where this project leans on Ray's behaviour beyond its public API: the one module that does.

Each piece has a test in tests/test_ray_internals.py that fails when a Ray upgrade changes what it
relies on (ARCHITECTURE.md, "Facts about Ray 2.60 the code relies on"):

- ``local_ray_instances``: Ray has no public call that lists the Ray instances of this machine
  without joining one; ``tune.py`` must refuse to start a second (Ray Train's placement-group
  cleaner fails beside another instance).
- ``OwnRequest``: Ray Tune reuses a finished trial's process for a pending trial with an *equal*
  resource request (its actor cache is keyed by the request). A TorchTrainer trial's process is
  still blocked in its Train controller after ASHA stops it (ray-project/ray#29268), so such trials
  each get a request equal to no other.
- ``unreadable_saved_state``: the names and formats of the files ``Tuner.restore`` reads a search
  back from, which Tune does not document.
- ``train_report_pace``: Ray Train's controller takes a worker's report once per
  ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S`` (2 s by default), and a worker blocks on a queue of one
  report, so with the default no epoch of a trial or refit is shorter than 2 s.
- ``prepare_cluster_config`` and ``default_inbound_rules``: the offline steps of ``ray up``
  (its own validation of cluster.yaml), used by the tests of cluster.yaml.
"""

from __future__ import annotations

import json
import os
import pickle
import uuid
from collections.abc import Callable
from typing import Any

from ray.tune import PlacementGroupFactory


def local_ray_instances() -> list[str]:
    """The GCS addresses of the Ray instances running on this machine."""
    from ray._private.services import find_gcs_addresses

    return sorted(find_gcs_addresses())


class OwnRequest(PlacementGroupFactory):
    """A resource request equal to no other trial's, so Ray Tune never hands this trial's process
    to another trial."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.owner = uuid.uuid4().hex

    def __eq__(self, other) -> bool:
        return isinstance(other, OwnRequest) and other.owner == self.owner

    def __hash__(self) -> int:
        return hash(self.owner)


# The files of a Tune experiment folder that Tuner.restore reads a search back from (the newest of
# each, by name): the trials (JSON), Tune's search generator and the searcher ((cloud)pickle).
SAVED_STATE: tuple[tuple[str, str, Callable[[bytes], Any]], ...] = (
    ("experiment_state-", ".json", json.loads),
    ("search_gen_state-", ".json", pickle.loads),
    ("searcher-state-", ".pkl", pickle.loads),
)


def unreadable_saved_state(names: list[str], read: Callable[[str], bytes]) -> str | None:
    """What keeps Tune from restoring an experiment folder holding the files ``names``
    (``read(name)`` gives one's bytes): a saved-state file missing or cut short; None when every one
    reads."""
    for prefix, suffix, load in SAVED_STATE:
        saved = sorted(name for name in names if name.startswith(prefix) and name.endswith(suffix))
        if not saved:
            return f"no {prefix}*{suffix}"
        try:
            load(read(saved[-1]))
        except Exception as exc:  # cut short: JSON, pickle and EOF errors alike
            return f"{saved[-1]} is damaged ({type(exc).__name__})"
    return None


# Ray Train's controller polls its workers for reports this often (seconds), and a worker waits
# until its previous report is taken: 0.25 s keeps short epochs from waiting on the poll.
TRAIN_REPORT_POLL = ("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")


def train_report_pace() -> dict[str, str]:
    """The variable Ray Train's workers and controller need so that reports are taken as soon as
    they are made; a value the user set wins."""
    name, value = TRAIN_REPORT_POLL
    return {name: os.environ.get(name, value)}


def prepare_cluster_config(config: dict) -> dict:
    """cluster.yaml as ``ray up`` checks it before it contacts the cloud: merged over Ray's
    defaults for its provider, then validated against Ray's schema (raises on a bad file)."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(config)
    validate_config(prepared)
    return prepared


def default_inbound_rules(cluster_group: str, declared: list[dict]) -> list[dict]:
    """The inbound rules ``ray up`` authorises on the AWS security group it creates for the
    cluster, given the file's own ``provider.security_group.IpPermissions``."""
    from ray.autoscaler._private.aws.config import _create_default_inbound_rules

    return _create_default_inbound_rules({cluster_group}, declared)
