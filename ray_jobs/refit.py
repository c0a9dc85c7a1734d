"""Refitting chosen configurations on all training data (or K folds) and predicting the test set.

Each model trains as its search trial did: a head on cached features in a Ray Tune trial process,
anything else as one Ray Train ``TorchTrainer`` run with a trial's resources. The runs are the
trials of a small Ray Tune experiment so that they run side by side when the cluster has room, are
retried from their checkpoints when they fail, and never resume an earlier refit (each refit has
its own folder).
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pandas as pd
import torch
from ray import tune

from ray_jobs.console import RefitReporter
from ray_jobs.results import ResultsStore, config_of, ranked
from ray_jobs.space import Resources
from ray_jobs.trial import make_trainable, report_epoch, resumed_run
from ray_jobs.tuning import fit_noting_ctrl_c, retries_and_checkpoints
from sketch_core.config import TrainConfig
from sketch_core.data import read_test_table
from sketch_core.errors import SketchError

# The TrainConfig fields that decide which training images a run holds out for validation.
SPLIT_FIELDS = ("data_dir", "val_fraction", "folds", "fold", "seed", "group_duplicates")


@dataclass(frozen=True)
class ModelSpec:
    """One model of the final ensemble: a configuration, how long to train it, which fold."""

    model_id: str
    member: str  # the configuration's name in the ensemble (top1, top2, ...): its folds share it
    source_trial: str
    config: dict[str, Any]
    until_epoch: int
    # A checkpoint of the source trial to begin with (trial.resumed_run): {"checkpoint": its
    # folder, "whole": continue the trial as it was, or take only its weights and train afresh}.
    start: dict[str, Any] | None = None


def choose_models(
    trials: pd.DataFrame,
    *,
    metric: str,
    mode: str,
    searched: list[str],
    base: dict[str, Any],
    top_k: int,
    folds: int,
    epochs: int | None,
    data_dir: str,
    trial_id: str | None = None,
    checkpoints: dict[str, str] | None = None,
) -> list[ModelSpec]:
    """The ``top_k`` best distinct configurations (or the one of ``trial_id``), each on all data or
    on each of ``folds`` folds. With ``checkpoints`` (trial id: its best checkpoint), a warm refit:
    each model starts from its trial's weights and trains ``epochs`` epochs on all the data."""
    scored = ranked(trials, metric=metric, mode=mode)
    scored = scored[scored["best_epoch"] > 0]
    searched_columns = [f"config.{name}" for name in searched if f"config.{name}" in scored]
    distinct = scored.drop_duplicates(subset=searched_columns or ["config.model"])
    if trial_id is not None:
        distinct = scored[scored["trial_id"] == trial_id]
        if not len(distinct):
            known = ", ".join(scored["trial_id"].head(8))
            raise SketchError(
                f"--trial {trial_id}: no trial with that id reported a result "
                f"(trials with one: {known})"
            )
    if len(distinct) < top_k:
        raise SketchError(
            f"--top-k {top_k}: the search has only {len(distinct)} distinct configuration(s) "
            "with a result"
        )
    specs = []
    for rank, (_, trial) in enumerate(distinct.head(top_k).iterrows()):
        config = config_of(trial, base)
        config["data_dir"] = data_dir
        until = int(trial["best_epoch"])
        if (
            checkpoints is not None
        ):  # warm: the extra data's share of the trial's epochs, at least 1
            share = config["val_fraction"] / (1 - config["val_fraction"])
            epochs = epochs or max(1, round(until * share))
        if epochs:  # a whole schedule of the given length
            config["epochs"], until = epochs, epochs
        splits = (
            [(k, {"folds": folds, "fold": k}) for k in range(folds)]
            if folds
            else [(None, {"val_fraction": 0.0, "folds": 0})]
        )
        for fold, split in splits:
            member = f"top{rank + 1}"
            model_id = member + (f"-fold{fold}" if fold is not None else "")
            specs.append(
                ModelSpec(
                    model_id=model_id,
                    member=member,
                    source_trial=str(trial["trial_id"]),
                    config=TrainConfig.from_dict({**config, **split}).to_dict(),
                    until_epoch=until,
                    start=None
                    if checkpoints is None
                    else {"checkpoint": checkpoints[trial["trial_id"]], "whole": False},
                )
            )
    return specs


def training_share(config: dict[str, Any]) -> float:
    """The share of the training images a run of this TrainConfig dict trains on."""
    if config["folds"]:
        return (config["folds"] - 1) / config["folds"]
    return 1 - config["val_fraction"]


def seconds_per_model(
    left: dict[str, float], *, models: int, at_once: int, gpus: float, elapsed_s: float
) -> float | None:
    """The wall seconds the budget left (``left``: hours and GPU-hours, final_fit.budget_left)
    gives each of ``models`` refits run ``at_once`` at a time, holding ``gpus`` GPUs in all, once
    ``elapsed_s`` of the final fit have passed; None without a budget."""
    limits = []
    if "hours" in left:
        limits.append((left["hours"] * 3600 - elapsed_s) / math.ceil(models / at_once))
    if "gpu_hours" in left and gpus > 0:
        limits.append(left["gpu_hours"] * 3600 / gpus)
    return max(0.0, min(limits)) if limits else None


def budget_sized(
    specs: list[ModelSpec],
    *,
    trials: pd.DataFrame,
    epochs: pd.DataFrame,
    base: dict[str, Any],
    seconds: float,
) -> tuple[list[ModelSpec], list[str]]:
    """Each refit with as many epochs (a whole schedule) as fit in ``seconds``, timed by its
    search trial: the trial's start-up and its median seconds per epoch (from the cumulative
    ``trial_s`` of epochs.parquet), scaled by the share of the training images each trains on.
    One epoch's time is kept for predicting the test set. Returns the specs and a line on each."""
    sized, lines = [], []
    for spec in specs:
        trial = trials.loc[trials["trial_id"] == spec.source_trial].iloc[0]
        spent = (
            epochs.loc[epochs["trial_id"] == spec.source_trial]
            .sort_values("epoch")["trial_s"]
            .dropna()
            .to_numpy()
        )
        trial_epoch = float(np.median(np.diff(spent))) if len(spent) > 1 else float(spent[0])
        start_up = max(0.0, float(spent[0]) - trial_epoch)
        trial_share, share = training_share(config_of(trial, base)), training_share(spec.config)
        per_epoch = trial_epoch * share / trial_share
        count = max(1, int((seconds - start_up) // per_epoch) - 1)
        sized.append(
            replace(
                spec,
                config=TrainConfig.from_dict({**spec.config, "epochs": count}).to_dict(),
                until_epoch=count,
            )
        )
        lines.append(
            f"{spec.model_id}: {count} epochs (trial {spec.source_trial}: {start_up:.0f} s to "
            f"start, {trial_epoch:.3g} s per epoch on {trial_share:.0%} of the training images, "
            f"so {per_epoch:.3g} s on {share:.0%})"
        )
    return sized, lines


def trial_models(
    trials: pd.DataFrame,
    *,
    metric: str,
    mode: str,
    base: dict[str, Any],
    top_k: int,
    data_dir: str,
    checkpoints: dict[str, str],
) -> list[ModelSpec]:
    """The ``top_k`` best trials' own models, as each was at its best epoch (its checkpoint then),
    to predict their validation images and the test set without training: one member each."""
    scored = ranked(trials, metric=metric, mode=mode)
    scored = scored[scored["trial_id"].isin(checkpoints)].head(top_k)
    return [
        ModelSpec(
            model_id=f"trial-{trial['trial_id']}",
            member=f"trial-{trial['trial_id']}",
            source_trial=str(trial["trial_id"]),
            config=TrainConfig.from_dict(
                {**config_of(trial, base), "data_dir": data_dir}
            ).to_dict(),
            until_epoch=int(trial["best_epoch"]),
            start={"checkpoint": checkpoints[trial["trial_id"]], "whole": True},
        )
        for _, trial in scored.iterrows()
    ]


def refit_loop(config: dict[str, Any], session) -> None:
    """Train one model to its epoch (none for a trial's model as it was), predict the test set and
    the training images it held out (a fold, or a trial's validation split) with every rank, save
    it (rank 0)."""
    job = config["job"]
    store = ResultsStore(job["results"], job["experiment"])
    start = job["start"] and {
        **job["start"],
        "checkpoint": store.fs_path_of(job["start"]["checkpoint"]),
    }
    run = resumed_run(
        TrainConfig.from_dict(job["config"], source="refit config"),
        session,
        start=start,
        filesystem=store.fs if store.scheme else None,
    )
    metrics: dict[str, Any] = {}
    for metrics in run.epochs(until=job["until_epoch"]):
        report_epoch(metrics, run, session)
    test = read_test_table(run.config.data_dir)
    probs = run.predict(test.paths, tta=job["tta"])
    heldout = run.split[1]  # the training images this model never trained on
    if len(heldout):
        heldout_probs = run.predict([run.table.paths[i] for i in heldout], tta=job["tta"])
    if session.world_rank() == 0:
        if not (job["start"] or {}).get("whole"):  # a trial's model as it was is its checkpoint
            save_weights(run, store, f"{job['folder']}/{job['model_id']}.pt")
        store.write_bytes(f"{job['folder']}/probs-{job['model_id']}.npy", npy_bytes(probs))
        if len(heldout):
            store.write_bytes(
                f"{job['folder']}/heldout-{job['model_id']}.npz",
                npz_bytes(rows=np.asarray(heldout), probs=heldout_probs),
            )
    session.report(
        {
            "epoch": run.epoch,
            "predicted": len(test.paths),
            **({"val_acc": metrics["val_acc"]} if "val_acc" in metrics else {}),
        }
    )


def save_weights(run, store: ResultsStore, name: str) -> None:
    """The weights the run predicts with, its config and classes: a refit's model."""
    weights = io.BytesIO()
    torch.save(
        {
            "model": run.eval_model.state_dict(),
            "config": run.config.to_dict(),
            "class_names": run.table.class_names,
            "epoch": run.epoch,
        },
        weights,
    )
    store.write_bytes(name, weights.getvalue())


def out_of_fold(
    store: ResultsStore, folder: str, specs: list[ModelSpec], images: int
) -> dict[str, tuple]:
    """Each fold-refitted configuration's out-of-fold probabilities, rows in train.csv order, and
    the fold that predicted each row."""
    members: dict[str, tuple] = {}
    for spec in specs:
        with np.load(
            io.BytesIO(store.read_bytes(f"{folder}/heldout-{spec.model_id}.npz"))
        ) as heldout:
            rows, probs = heldout["rows"], heldout["probs"]
        if spec.member not in members:
            members[spec.member] = (np.full((images, probs.shape[1]), np.nan), np.full(images, -1))
        oof, fold_of_row = members[spec.member]
        if (fold_of_row[rows] >= 0).any():
            raise SketchError(
                f"{store.uri(folder)}: folds of {spec.member} overlap; the refit is damaged"
            )
        oof[rows], fold_of_row[rows] = probs, spec.config["fold"]
    for member, (_, fold_of_row) in members.items():
        if (fold_of_row < 0).any():
            raise SketchError(
                f"{store.uri(folder)}: the folds of {member} leave {int((fold_of_row < 0).sum())} "
                "training images unpredicted"
            )
    return members


def refit_train_config(config: dict[str, Any]) -> dict[str, Any]:
    """The TrainConfig dict of a refit's Tune config."""
    return config["job"]["config"]


def fit_models(
    specs: list[ModelSpec],
    *,
    store: ResultsStore,
    folder: str,
    resources: Resources,
    tta: bool,
    max_failures: int,
    max_concurrent: int,
    verbose: bool = False,
) -> tuple[pd.DataFrame, bool]:
    """Run every refit, side by side as far as ``max_concurrent`` and the cluster allow, with a
    line per epoch (``verbose``: Tune's own tables instead).

    Returns one row per model (model_id, epoch, val_acc of fold models, done, error) and whether
    Ctrl-C ended the run.
    """
    jobs = [
        {
            "model_id": s.model_id,
            "config": s.config,
            "until_epoch": s.until_epoch,
            "tta": tta,
            "start": s.start,
            "results": store.root,
            "experiment": store.experiment,
            "folder": folder,
        }
        for s in specs
    ]
    trainable = make_trainable(
        refit_loop,
        resources=resources,
        keep_checkpoints=1,
        metric="epoch",
        mode="max",
        train_config=refit_train_config,
        predicts_only=lambda config: bool((config["job"]["start"] or {}).get("whole")),
    )
    tuner = tune.Tuner(
        trainable,
        param_space={"job": tune.grid_search(jobs)},
        tune_config=tune.TuneConfig(max_concurrent_trials=max_concurrent, reuse_actors=True),
        run_config=tune.RunConfig(
            name="tune",
            storage_path=store.fs_path(folder),
            storage_filesystem=store.fs,
            callbacks=[] if verbose else [RefitReporter()],
            verbose=2 if verbose else 0,
            **retries_and_checkpoints(
                max_failures=max_failures, keep_checkpoints=1, metric="epoch", mode="max"
            ),
        ),
    )
    # A refit that Ctrl-C stopped before it started has no result config: it stays not done, no
    # error.
    rows = {
        job["model_id"]: {
            "model_id": job["model_id"],
            "epoch": None,
            "val_acc": None,
            "done": False,
            "error": "",
        }
        for job in jobs
    }
    results, interrupted = fit_noting_ctrl_c(tuner)
    for result in results:
        if result.config is None:
            continue
        metrics = result.metrics or {}
        rows[result.config["job"]["model_id"]].update(
            epoch=metrics.get("epoch"),
            val_acc=metrics.get("val_acc"),
            done="predicted" in metrics,
            error=str(result.error).strip().splitlines()[-1][:300] if result.error else "",
        )
    return pd.DataFrame(list(rows.values())), interrupted


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def npz_bytes(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def load_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data))
