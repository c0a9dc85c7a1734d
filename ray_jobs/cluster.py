"""Starting or joining Ray, and checking that one trial can ever fit the cluster."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import ray
import yaml

from ray_jobs.ray_internals import local_ray_instances
from ray_jobs.space import Resources
from sketch_core.errors import SketchError

# Written on the head node by `ray up`: the node types the autoscaler may add.
AUTOSCALER_CONFIG = Path.home() / "ray_bootstrap_config.yaml"


def start_ray(
    address: str | None, *, num_cpus: int | None = None, verbose: bool = True
) -> str | None:
    """Join the cluster at ``address`` or start local Ray with its dashboard on 127.0.0.1.

    ``verbose``: the workers' output and Ray's INFO lines on this console; otherwise they stay in
    the Ray session's log files (and the dashboard's Logs tab).
    Returns the dashboard URL (None when joining: reach it through ``ray dashboard cluster.yaml``).
    """
    # Quiet keeps Ray's own logging level (RAY_LOGGER_LEVEL) unless it would print INFO lines here.
    output = {"log_to_driver": verbose, **({} if verbose else {"logging_level": logging.WARNING})}
    from ray_jobs.trial import worker_env

    runtime_env = {"env_vars": worker_env()}
    if _in_ray_job():
        runtime_env = (
            None  # `ray job submit --working-dir .` already ships the code to every worker
        )
    if address:
        ray.init(address=address, runtime_env=runtime_env, **output)
        return None
    running = _other_local_ray()
    if running:
        # Ray Train's PlacementGroupCleaner finds "the" local instance through the State API and
        # fails when there are two, so trials stopped by ASHA would keep their resources forever.
        raise SketchError(
            f"another Ray instance is running on this machine ({', '.join(sorted(running))}); "
            "stop it (`ray stop`, or end the script that started it) or join it with --address auto"
        )
    # The dashboard is required, not cosmetic: Ray Train frees the placement group of a trial
    # that ASHA stopped only through the State API it serves.
    context = ray.init(
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        num_cpus=num_cpus,
        runtime_env=runtime_env,
        **output,
    )
    return f"http://{context.dashboard_url}" if context.dashboard_url else None


def _other_local_ray(grace_s: float = 15.0) -> list[str]:
    """The GCS addresses of Ray instances running on this machine, once those still shutting down
    (a script or test that has just called ray.shutdown) have had ``grace_s`` to exit."""
    deadline = time.monotonic() + grace_s
    while (running := local_ray_instances()) and time.monotonic() < deadline:
        time.sleep(0.5)
    return list(running)


def _in_ray_job() -> bool:
    return bool(os.environ.get("RAY_JOB_ID") or os.environ.get("RAY_JOB_SUBMISSION_ID"))


def trials_at_once(needs: dict[str, float]) -> int:
    """How many trials that each hold ``needs`` the cluster's resources hold at once now (at
    least 1: an autoscaling cluster may grow)."""
    total = ray.cluster_resources()
    return max(
        1, min(int(total.get(key, 0.0) // amount) for key, amount in needs.items() if amount > 0)
    )


def check_trial_fits(resources: Resources, source: str) -> None:
    """Refuse a trial (of any of the searched models) that no node set this cluster has, or may
    autoscale to, can ever hold."""
    nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
    node_types = nodes + _autoscaler_node_types()
    kinds = [
        ("resources", resources),
        *((f"resources.by_model.{model}", own) for model, own in resources.by_model.items()),
    ]
    for section, kind in kinds:
        for what, needs, fields in (
            ("one worker", kind.per_worker(), "cpus_per_worker/gpus_per_worker"),
            ("one head-only trial", kind.head_trial(), "head_cpus/head_gpus"),
        ):
            if not any(
                all(node.get(key, 0) >= amount for key, amount in needs.items())
                for node in node_types
            ):
                raise SketchError(
                    f"{source}: {section}: {what} needs {_describe(needs)}, but no node of this "
                    f"cluster has that much (largest: {_describe(_largest(node_types, needs))}); "
                    f"lower {fields}"
                )
        trial = kind.per_trial()
        capacity = {key: sum(node.get(key, 0) for node in node_types) for key in trial}
        if any(capacity[key] < amount for key, amount in trial.items()):
            raise SketchError(
                f"{source}: {section}: one trial needs {_describe(trial)} ({kind.workers} workers "
                f"plus the trial's own {Resources.TRIAL_CPUS} CPU), but this cluster can have at "
                f"most {_describe(capacity)}; "
                "lower workers, cpus_per_worker or gpus_per_worker, or use a larger cluster"
            )


def _autoscaler_node_types() -> list[dict[str, float]]:
    if not AUTOSCALER_CONFIG.is_file():
        return []
    config = yaml.safe_load(AUTOSCALER_CONFIG.read_text()) or {}
    node_types = []
    for node_type in (config.get("available_node_types") or {}).values():
        node_types += [node_type.get("resources") or {}] * int(node_type.get("max_workers", 0))
    return node_types


def _largest(node_types: list[dict[str, float]], wanted: dict[str, float]) -> dict[str, float]:
    if not node_types:
        return {key: 0 for key in wanted}
    return {key: max(node.get(key, 0) for node in node_types) for key in wanted}


def _describe(amounts: dict[str, float]) -> str:
    return ", ".join(f"{amount:g} {key}" for key, amount in amounts.items())
