"""One trial of a search, in one of two forms chosen by its configuration:

- a head trained on cached backbone features runs in Ray Tune's own trial process: no Ray Train,
  no DDP (a head on cached features needs none). Ray Tune reuses that process for the next such
  trial, which finds the frozen backbone and the features the process keeps (sketch_core.features);
- anything else is a Ray Train ``TorchTrainer`` running the sketch_core loop on N DDP workers
  (Train V2 refuses ``Tuner(TorchTrainer)``, so a Tune function trainable fits one per trial).

Both run the same loop and report each epoch with the same metrics and a checkpoint, through a
``session``: Ray Train's API in a Train worker, Ray Tune's in the trial process (Train V2's calls
raise there). final_fit's refits use the same pieces with their own loop.
"""

from __future__ import annotations

import gc
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ray
import ray.train
import torch.distributed as dist
from ray import tune
from ray.train.torch import TorchConfig, TorchTrainer
from ray.tune import PlacementGroupFactory

from ray_jobs.ray_internals import OwnRequest
from ray_jobs.space import Resources, runs_in_trial_process
from sketch_core.config import TrainConfig

if TYPE_CHECKING:
    from sketch_core.engine import TrainingRun

CHECKPOINT_FILE = "state.pt"
# Tune's progress table shows the first four reported metrics: report these first.
TABLE_METRICS = ("epoch", "val_acc", "val_loss", "images_per_s")


class InTrainWorker:
    """A loop's link to Ray in a TorchTrainer's worker: Ray Train's API."""

    @staticmethod
    def get_checkpoint():
        return ray.train.get_checkpoint()

    @staticmethod
    def report(metrics: dict[str, Any], checkpoint_folder: str | None = None) -> None:
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(checkpoint_folder)
            if checkpoint_folder
            else None,
        )

    @staticmethod
    def world_rank() -> int:
        return ray.train.get_context().get_world_rank()

    @staticmethod
    def device():
        return ray.train.torch.get_device()


class InTrialProcess:
    """A loop's link to Ray in Ray Tune's trial process: Ray Tune's API, one rank, its own device
    (Ray gives the process its GPU share as CUDA device 0)."""

    @staticmethod
    def get_checkpoint():
        return tune.get_checkpoint()

    @staticmethod
    def report(metrics: dict[str, Any], checkpoint_folder: str | None = None) -> None:
        tune.report(
            metrics,
            checkpoint=tune.Checkpoint.from_directory(checkpoint_folder)
            if checkpoint_folder
            else None,
        )

    @staticmethod
    def world_rank() -> int:
        return 0

    @staticmethod
    def device():
        from sketch_core.engine import default_device

        return default_device()


IN_TRAIN_WORKER, IN_TRIAL_PROCESS = InTrainWorker(), InTrialProcess()


def train_loop(config: dict[str, Any], session) -> None:
    """Train one configuration, reporting every epoch (ASHA may stop it)."""
    run = resumed_run(TrainConfig.from_dict(config, source="trial config"), session)
    started_at_epoch = run.epoch  # > 0 after a restart from a checkpoint
    nodes, pids = worker_placement()
    if run.epoch >= run.config.epochs and run.last_metrics:
        # A trial that finished after the search's last saved state is rerun by a restore:
        # report its final epoch again so Tune and the searcher see its real result.
        session.report(
            {**run.last_metrics, "started_at_epoch": started_at_epoch, "nodes": nodes, "pids": pids}
        )
        return
    for epoch_metrics in run.epochs():
        metrics = {
            **{key: epoch_metrics[key] for key in TABLE_METRICS if key in epoch_metrics},
            **epoch_metrics,
            "started_at_epoch": started_at_epoch,
            "nodes": nodes,
            "pids": pids,
        }
        report_epoch(metrics, run, session)


def resumed_run(
    config: TrainConfig, session, *, start: dict[str, Any] | None = None, filesystem=None
) -> TrainingRun:
    """A TrainingRun on the session's device, continuing from the session's latest checkpoint if
    there is one (after a failure, or in a restored search). Otherwise ``start``, if given, names a
    checkpoint folder of another run to begin with (a search trial's, for a refit; on
    ``filesystem``, a pyarrow filesystem, or local): ``{"checkpoint": folder, "whole": True}``
    continues that run as it was; ``"whole": False`` takes only its weights and trains afresh
    (``TrainingRun(start_from=...)``)."""
    # Imported here: the trial and controller processes of DDP trials, which never train, skip timm
    # & co.
    from sketch_core.engine import TrainingRun

    own = session.get_checkpoint()
    if own is not None:
        return TrainingRun(config, device=session.device(), state=checkpoint_state(own))
    if start is None:
        return TrainingRun(config, device=session.device())
    source = checkpoint_state(ray.train.Checkpoint(start["checkpoint"], filesystem=filesystem))
    if start["whole"]:
        return TrainingRun(config, device=session.device(), state=source)
    return TrainingRun(config, device=session.device(), start_from=source)


def checkpoint_state(checkpoint) -> dict[str, Any]:
    """The TrainingRun state in a Ray checkpoint (Train's or Tune's) of a trial or refit."""
    from sketch_core.engine import load_checkpoint

    with checkpoint.as_directory() as folder:
        return load_checkpoint(Path(folder) / CHECKPOINT_FILE)


def report_epoch(metrics: dict[str, Any], run: TrainingRun, session) -> None:
    """Every rank reports each epoch; rank 0 attaches the checkpoint."""
    from sketch_core.engine import save_checkpoint

    if session.world_rank() != 0:
        session.report(metrics)
        return
    with tempfile.TemporaryDirectory() as folder:
        save_checkpoint(run.state_dict(), Path(folder) / CHECKPOINT_FILE)
        session.report(metrics, checkpoint_folder=folder)


def worker_placement() -> tuple[str, str]:
    """Where this trial's workers run: the nodes (``ip/node-id``, sorted, distinct) and the
    process IDs by rank, each comma-separated."""
    here = (
        f"{ray.util.get_node_ip_address()}/{ray.get_runtime_context().get_node_id()[:8]}",
        os.getpid(),
    )
    everyone = [here]
    if dist.is_initialized():
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, here)
    return ",".join(sorted({node for node, _ in everyone})), ",".join(
        str(pid) for _, pid in everyone
    )


class OnTrainWorkers:
    """``loop(config, IN_TRAIN_WORKER)``: the one-argument function a TorchTrainer runs."""

    def __init__(self, loop: Callable[[dict, Any], None]):
        self.loop = loop

    def __call__(self, config: dict[str, Any]) -> None:
        self.loop(config, IN_TRAIN_WORKER)


def make_trainable(
    loop: Callable[[dict, Any], None],
    *,
    resources: Resources,
    keep_checkpoints: int,
    metric: str,
    mode: str,
    train_config: Callable[[dict], dict] = lambda config: config,
    predicts_only: Callable[[dict], bool] = lambda config: False,
) -> Callable:
    """A Tune function trainable running ``loop(config, session)``: in the trial's own process for a
    head on cached features, else on every worker of one TorchTrainer (``resources`` of the trial's
    model). ``train_config`` reads the TrainConfig dict in a trial's config. Tune (and so
    ASHA) sees each epoch either reports. Failed trials of both kinds are retried by Tune (its
    FailureConfig: tuning.py), so the TorchTrainer itself never retries: retries do not multiply.
    ``predicts_only(config)``: a job that trains nothing (final_fit's predictions with a trial's
    model) runs in the trial's own process too, with one worker's resources: DDP would only add
    its start-up."""
    from ray.tune.integration.ray_train import TuneReportCallback

    def in_trial_process(config: dict[str, Any]) -> bool:
        return predicts_only(config) or runs_in_trial_process(train_config(config))

    def run_trial(config: dict[str, Any]) -> None:
        if in_trial_process(config):
            _free_what_the_last_trial_left()
            loop(config, IN_TRIAL_PROCESS)
            return
        # Read where the TorchTrainer is built: the dashboard's Train tab lists only tracked runs.
        os.environ.setdefault("RAY_TRAIN_ENABLE_STATE_TRACKING", "1")
        # The Train run lives in the trial's own folder under a fixed name, so a retried or restored
        # trial finds its checkpoints. (get_trial_dir() is session-local and changes on restore.)
        storage = tune.get_context().get_storage()
        own = resources.of_model(train_config(config)["model"])
        TorchTrainer(
            OnTrainWorkers(loop),
            train_loop_config=config,
            scaling_config=ray.train.ScalingConfig(
                num_workers=own.workers, use_gpu=own.use_gpu, resources_per_worker=own.per_worker()
            ),
            torch_config=TorchConfig(backend="nccl" if own.use_gpu else "gloo"),
            run_config=ray.train.RunConfig(
                name="train",
                storage_path=storage.trial_fs_path,
                storage_filesystem=storage.storage_filesystem,
                callbacks=[TuneReportCallback()],
                checkpoint_config=ray.train.CheckpointConfig(
                    num_to_keep=keep_checkpoints,
                    checkpoint_score_attribute=metric,
                    checkpoint_score_order=mode,
                ),
                failure_config=ray.train.FailureConfig(max_failures=0),
            ),
        ).fit()

    return tune.with_resources(
        run_trial,
        lambda config: trial_request(
            train_config(config), resources, predicts_only=predicts_only(config)
        ),
    )


def trial_request(
    config: dict[str, Any], resources: Resources, *, predicts_only: bool = False
) -> PlacementGroupFactory:
    """What the Tune trial process of this TrainConfig dict asks for: a head-only trial its share,
    a job that only predicts one worker's, each equal for all of its kind (so their processes are
    reused); a TorchTrainer trial its own 0.05 CPU (its workers ask for theirs), in a request equal
    to no other."""
    own = resources.of_model(config["model"])
    if runs_in_trial_process(config):
        return PlacementGroupFactory([own.head_trial()])
    if predicts_only:
        return PlacementGroupFactory([own.per_worker()])
    return OwnRequest([{"CPU": Resources.TRIAL_CPUS}])


def _free_what_the_last_trial_left() -> None:
    """Give the GPU memory of the process's previous trial back (its model, optimiser, EMA); the
    kept backbone and features stay. Done when the next trial starts: a stopped trial's frames
    live on in its exception until then. (On the CPU, Python's collector frees it in time: a full
    collection costs a head trial's own training time there.)"""
    import torch

    if torch.cuda.is_initialized():
        gc.collect()
        torch.cuda.empty_cache()


def worker_env() -> dict[str, str]:
    """Environment every Ray worker process needs: Train's timeouts and report pace, and the cache
    folder as an absolute path. (The code itself reaches the workers as the installed package:
    requirements.txt installs this project on every node, and `ray job submit --working-dir .`
    ships it.)"""
    from ray_jobs.cli import PATH_VARIABLES, local_path
    from ray_jobs.ray_internals import train_report_pace

    return {
        **train_report_pace(),
        "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": os.environ.get(
            "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "600"
        ),
        **{name: local_path(os.environ[name]) for name in PATH_VARIABLES if os.environ.get(name)},
    }
