"""One trial: a Ray Train ``TorchTrainer`` that runs the sketch_core loop on N DDP workers.

``train_worker`` runs in every worker process; ``make_trainable`` builds the Tune function
trainable that fits one TorchTrainer per trial (Train V2 refuses ``Tuner(TorchTrainer)``).
final_fit's refits reuse the same pieces with their own worker loop.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import ray
import ray.train
import torch.distributed as dist
from ray import tune
from ray.train.torch import TorchConfig, TorchTrainer

from sketch_core.config import TrainConfig
from ray_jobs.space import Resources

if TYPE_CHECKING:
    from sketch_core.engine import TrainingRun

CHECKPOINT_FILE = "state.pt"
# Tune's progress table shows the first four reported metrics: report these first.
TABLE_METRICS = ("epoch", "val_acc", "val_loss", "images_per_s")


def train_worker(config: dict[str, Any]) -> None:
    """Train one configuration on this worker's shard, reporting every epoch (ASHA may stop it)."""
    run = resumed_run(TrainConfig.from_dict(config, source="trial config"))
    started_at_epoch = run.epoch  # > 0 after a restart from a checkpoint
    nodes, pids = worker_placement()
    if run.epoch >= run.config.epochs and run.last_metrics:
        # A trial that finished after the search's last saved state is rerun by a restore:
        # report its final epoch again so Tune and the searcher see its real result.
        ray.train.report({**run.last_metrics, "started_at_epoch": started_at_epoch, "nodes": nodes, "pids": pids})
        return
    for epoch_metrics in run.epochs():
        metrics = {**{key: epoch_metrics[key] for key in TABLE_METRICS if key in epoch_metrics}, **epoch_metrics,
                   "started_at_epoch": started_at_epoch, "nodes": nodes, "pids": pids}
        report_epoch(metrics, run)


def resumed_run(config: TrainConfig) -> "TrainingRun":
    """A TrainingRun on this worker's device, continuing from the Train run's latest checkpoint if
    there is one (after a worker failure, or in a restored search)."""
    # Imported here: the trial and controller processes, which never train, skip timm & co.
    from sketch_core.engine import TrainingRun, load_checkpoint

    checkpoint = ray.train.get_checkpoint()
    state = None
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state = load_checkpoint(Path(folder) / CHECKPOINT_FILE)
    return TrainingRun(config, device=ray.train.torch.get_device(), state=state)


def report_epoch(metrics: dict[str, Any], run: "TrainingRun") -> None:
    """Every rank reports each epoch; rank 0 attaches the checkpoint."""
    from sketch_core.engine import save_checkpoint

    if ray.train.get_context().get_world_rank() != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as folder:
        save_checkpoint(run.state_dict(), Path(folder) / CHECKPOINT_FILE)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))


def worker_placement() -> tuple[str, str]:
    """Where this trial's workers run: the nodes (``ip/node-id``, sorted, distinct) and the
    process IDs by rank, each comma-separated."""
    here = (f"{ray.util.get_node_ip_address()}/{ray.get_runtime_context().get_node_id()[:8]}", os.getpid())
    everyone = [here]
    if dist.is_initialized():
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, here)
    return ",".join(sorted({node for node, _ in everyone})), ",".join(str(pid) for _, pid in everyone)


def make_trainable(train_loop: Callable[[dict], None], *, resources: Resources, max_failures: int,
                   keep_checkpoints: int, metric: str, mode: str) -> Callable:
    """A Tune function trainable that fits one TorchTrainer running ``train_loop`` on every worker;
    Tune (and so ASHA) sees each epoch the workers report."""
    from ray.tune.integration.ray_train import TuneReportCallback

    def run_trial(config: dict[str, Any]) -> None:
        # Read where the TorchTrainer is built: the dashboard's Train tab lists only tracked runs.
        os.environ.setdefault("RAY_TRAIN_ENABLE_STATE_TRACKING", "1")
        # The Train run lives in the trial's own folder under a fixed name, so a restored
        # trial finds its checkpoints. (get_trial_dir() is session-local and changes on restore.)
        storage = tune.get_context().get_storage()
        TorchTrainer(
            train_loop,
            train_loop_config=config,
            scaling_config=ray.train.ScalingConfig(num_workers=resources.workers, use_gpu=resources.use_gpu,
                                                   resources_per_worker=resources.per_worker()),
            torch_config=TorchConfig(backend="nccl" if resources.use_gpu else "gloo"),
            run_config=ray.train.RunConfig(
                name="train",
                storage_path=storage.trial_fs_path,
                storage_filesystem=storage.storage_filesystem,
                callbacks=[TuneReportCallback()],
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=keep_checkpoints,
                                                             checkpoint_score_attribute=metric,
                                                             checkpoint_score_order=mode),
                failure_config=ray.train.FailureConfig(max_failures=max_failures),
            ),
        ).fit()

    return tune.with_resources(run_trial, {"CPU": Resources.TRIAL_CPUS})


def worker_env() -> dict[str, str]:
    """Environment every Ray worker process needs: this repository importable, Train's timeouts, the
    cache folder as an absolute path."""
    from ray_jobs.cli import PATH_VARIABLES, local_path

    repo_root = str(Path(__file__).resolve().parents[1])
    python_path = os.pathsep.join(p for p in (repo_root, os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": python_path,
            "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": os.environ.get("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "600"),
            **{name: local_path(os.environ[name]) for name in PATH_VARIABLES if os.environ.get(name)}}
