"""The results contract (ARCHITECTURE.md, "Results") and the storage it lives on.

``results/<experiment>/`` may be a local folder, an NFS path or a cloud URI (``s3://``,
``gs://``): every read and write goes through a pyarrow filesystem. Files users keep are
written atomically (a temp object, then a move onto the final name).
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import time
import urllib.parse
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
from ray.tune import Callback

from ray_jobs.cli import local_path
from ray_jobs.params import SearchedParams, plain
from ray_jobs.space import Resources
from sketch_core.config import TrainConfig
from sketch_core.errors import SketchError

if TYPE_CHECKING:
    from ray_jobs.tracking import SearchRuns

SCHEMA_VERSION = (
    2  # 2: searched parameters a trial left inactive are empty; search.json has base, params
)
# val_acc_ema and val_acc_raw: what the EMA average and the raw weights each scored (EMA trials).
METRIC_COLUMNS = (
    "val_acc",
    "val_loss",
    "train_loss",
    "lr",
    "images_per_s",
    "val_acc_ema",
    "val_acc_raw",
    "val_images",
)
TRIAL_COLUMNS = (
    "trial_id",
    "status",
    "epochs_run",
    "best_val_acc",
    "best_epoch",
    "wall_s",
    "gpu_hours",
    "node",
    "error",
    "feature_cache",
)


class ResultsStore:
    """One experiment's folder, ``<root>/<experiment>``, on any pyarrow filesystem."""

    def __init__(self, root: str, experiment: str):
        self.root = local_path(
            root
        )  # absolute: refit workers open the store from their own folders
        self.experiment = experiment
        self.fs, root_path = _filesystem(root)
        self.scheme = root.split("://", 1)[0] + "://" if "://" in root else ""
        self.path = f"{root_path.rstrip('/')}/{experiment}"

    def uri(self, *parts: str) -> str:
        """What users are given: a local path or a full URI."""
        return self.scheme + self.fs_path(*parts)

    def fs_path(self, *parts: str) -> str:
        """The path on ``fs`` (a URI less its scheme): what Ray's ``storage_path`` is given along
        with ``storage_filesystem=fs``. (Given a filesystem, Ray takes the path as it is.)"""
        return "/".join([self.path, *parts])

    def uri_of(self, fs_path: str) -> str:
        """The URI of a path on ``fs`` that Ray reports (a checkpoint's: Ray drops the scheme)."""
        return fs_path if "://" in fs_path else self.scheme + fs_path

    def fs_path_of(self, uri: str) -> str:
        """The path on ``fs`` of a URI in this store (``uri_of`` undone)."""
        return uri.removeprefix(self.scheme) if self.scheme else uri

    def exists(self, name: str) -> bool:
        return self.fs.get_file_info(f"{self.path}/{name}").type != pafs.FileType.NotFound

    def write_bytes(self, name: str, data: bytes) -> str:
        target = f"{self.path}/{name}"
        self.fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
        partial = f"{target.rsplit('/', 1)[0]}/.{target.rsplit('/', 1)[1]}.partial-{os.getpid()}"
        with self.fs.open_output_stream(partial) as stream:
            stream.write(data)
        self.fs.move(partial, target)
        return self.uri(name)

    def read_bytes(self, name: str) -> bytes:
        try:
            with self.fs.open_input_stream(f"{self.path}/{name}") as stream:
                return stream.read()
        except FileNotFoundError:
            raise SketchError(f"{self.uri(name)}: not found") from None

    def write_json(self, name: str, value: Any) -> str:
        return self.write_bytes(
            name, (json.dumps(value, indent=2, default=_json_default) + "\n").encode()
        )

    def read_json(self, name: str, *, required: tuple[str, ...] = ()) -> Any:
        """The JSON object in ``name``; one error line if it is damaged (a full disk, a half-copied
        folder) or lacks a ``required`` key."""
        try:
            value = json.loads(self.read_bytes(name))
        except (
            ValueError
        ) as exc:  # JSONDecodeError, and UnicodeDecodeError for bytes that are not text
            raise SketchError(
                f"{self.uri(name)}: not valid JSON ({str(exc)[:120]}); the file is damaged"
            ) from None
        return self.require_keys(name, value, required)

    def require_keys(self, name: str, value: Any, keys: tuple[str, ...]) -> Any:
        """``value`` (read from ``name``) if it is an object with every one of ``keys``; else one
        error line."""
        missing = [key for key in keys if not isinstance(value, dict) or key not in value]
        if missing:
            raise SketchError(
                f"{self.uri(name)}: missing {', '.join(missing)}; the file is damaged or not ours"
            )
        return value

    def write_parquet(self, name: str, frame: pd.DataFrame) -> str:
        buffer = io.BytesIO()
        frame.to_parquet(buffer, index=False)
        return self.write_bytes(name, buffer.getvalue())

    def read_parquet(self, name: str) -> pd.DataFrame:
        data = self.read_bytes(name)
        try:
            return pd.read_parquet(io.BytesIO(data))
        except (pa.ArrowException, ValueError, OSError) as exc:  # truncated, empty or not parquet
            raise SketchError(
                f"{self.uri(name)}: not a readable table ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0][:120] if str(exc) else ''}); the file is damaged"
            ) from None

    def list_names(self, folder: str) -> list[str]:
        selector = pafs.FileSelector(f"{self.path}/{folder}", allow_not_found=True)
        return sorted(info.base_name for info in self.fs.get_file_info(selector))


# What the commands read of best.json (ExperimentTables.best writes it) and of search.json
# (tune.search_summary writes it).
BEST_KEYS = ("trial_id", "metric", "val_acc", "epoch", "config", "checkpoint")
SEARCH_KEYS = (
    "schema",
    "experiment",
    "data_dir",
    "class_names",
    "metric",
    "mode",
    "searched",
    "params",
    "base",
    "resources",
    "max_failures",
)


def read_search(store: ResultsStore) -> dict[str, Any]:
    """The experiment's search.json, checked: present, of this schema version, with every key."""
    if not store.exists("search.json"):
        raise SketchError(
            f"{store.uri()}: no search found (no search.json); run ray_jobs/tune.py first"
        )
    search = store.read_json("search.json", required=("schema",))
    if search["schema"] != SCHEMA_VERSION:
        raise SketchError(
            f"{store.uri('search.json')}: results schema {search['schema']!r}, this version reads "
            f"{SCHEMA_VERSION}; rerun the search with this version"
        )
    return store.require_keys("search.json", search, SEARCH_KEYS)


def latest_experiment(root: str) -> str:
    """The experiment under ``root`` whose search ran most recently (by its search.json)."""
    fs, root_path = _filesystem(root)
    candidates = []
    for info in fs.get_file_info(pafs.FileSelector(root_path, allow_not_found=True)):
        if info.type == pafs.FileType.Directory:
            marker = fs.get_file_info(f"{info.path}/search.json")
            if marker.type == pafs.FileType.File:
                candidates.append((marker.mtime_ns or 0, info.base_name))
    if not candidates:
        raise SketchError(f"{root}: no experiment found; run ray_jobs/tune.py first")
    return max(candidates)[1]


# Query parameters of a URI that pyarrow reads as credentials.
CREDENTIAL_PARAMETERS = ("access_key", "secret_key", "session_token")


def _filesystem(root: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem of a results root and the root's path on it. A bucket (s3://, gs://) is
    reached once here, with the endpoint and credentials of this process's environment
    (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ..., or ``?endpoint_override=`` in the URI), so
    that an unreachable endpoint, a missing bucket or refused credentials are one error line."""
    if "://" not in root:
        return pafs.LocalFileSystem(), str(Path(root).resolve())
    if carries_credentials(root):
        raise SketchError(
            f"--results: {root.split('://', 1)[0]}://... carries credentials, which would be "
            "written into search.json and Ray Tune's state; give them in the environment instead "
            "(AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE, a node's role)"
        )
    try:
        fs, path = pafs.FileSystem.from_uri(root)
        bucket = path.split("/", 1)[0]
        found = fs.get_file_info(bucket) if fs.type_name in ("s3", "gcs") else None
    except (ValueError, OSError, NotImplementedError) as exc:  # pyarrow's errors derive from these
        raise SketchError(f"--results {root}: {_storage_problem(exc)}") from None
    if found is not None and found.type == pafs.FileType.NotFound:
        raise SketchError(f"--results {root}: bucket {bucket!r} not found; create it first")
    return fs, path


def carries_credentials(uri: str) -> bool:
    """Whether ``uri`` has a user (``scheme://user:secret@...``, the secret URL-encoded or not) or
    credential parameters (``?secret_key=``)."""
    parts = urllib.parse.urlsplit(uri)
    return bool(
        "@" in parts.netloc
        or re.match(r"[^:]+://[^@?#]*:[^@?#]*@", uri)
        or set(urllib.parse.parse_qs(parts.query)) & set(CREDENTIAL_PARAMETERS)
    )


def _storage_problem(exc: Exception) -> str:
    """What pyarrow's error says, in one line, and what to check."""
    message = " ".join(str(exc).split())
    if "ACCESS_DENIED" in message or "403" in message:
        return (
            f"access denied ({message[:300]}); check the credentials in the environment "
            "(AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE, "
            "GOOGLE_APPLICATION_CREDENTIALS) and the bucket's permissions"
        )
    if "NETWORK_CONNECTION" in message or "connect" in message.lower():
        return (
            f"cannot reach the storage ({message[:300]}); check the endpoint "
            "(AWS_ENDPOINT_URL, or ?endpoint_override= in the URI)"
        )
    return f"cannot open this storage ({message[:300]})"


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def within_noise(
    accuracy_at: dict[str, dict[int, float]], trial_id: str, images: int
) -> dict | None:
    """Whether a trial stopped at its last epoch lost to noise: when its val_acc there lies within
    one standard error (of an accuracy on ``images`` validation images) of the best val_acc any
    trial had at that epoch, the validation set cannot tell the stop from chance. ``accuracy_at``:
    trial id: {epoch: val_acc}. Returns the epoch, the trial's and the best val_acc and the
    standard error then, or None."""
    curve = accuracy_at.get(trial_id) or {}
    if not curve or images <= 0:
        return None
    epoch = max(curve)
    best = max(other[epoch] for other in accuracy_at.values() if epoch in other)
    error = math.sqrt(max(best * (1 - best), 1e-12) / images)
    if best - curve[epoch] > error:
        return None
    return {"epoch": epoch, "val_acc": curve[epoch], "best": best, "standard_error": error}


def best_first(scores: list[float], mode: str) -> list[int]:
    """The positions of ``scores`` from the best to the worst by ``mode`` (max or min). Equal scores
    keep their order, the earlier trial first: the one ordering of trials that best.json, the
    refit's choice, the report and the console all use."""
    return sorted(range(len(scores)), key=lambda i: -scores[i] if mode == "max" else scores[i])


def ranked(trials: pd.DataFrame, *, metric: str, mode: str) -> pd.DataFrame:
    """The rows of trials.parquet that reported ``metric``, best first (``best_first``)."""
    column = f"best_{metric}"
    scored = trials.dropna(subset=[column]) if column in trials else trials.iloc[:0]
    return scored.iloc[best_first(scored[column].tolist(), mode)]


def best_epochs(epochs: pd.DataFrame, *, metric: str, mode: str) -> pd.DataFrame:
    """Each trial's row of epochs.parquet at its best ``metric``; of equal ones, the latest. Ray's
    CheckpointConfig(num_to_keep) ranks a later checkpoint above an equal earlier one and deletes
    the earlier first, so only the latest of tied epochs is sure to have kept its checkpoint
    (ARCHITECTURE.md, "Facts about Ray")."""
    scored = epochs.dropna(subset=[metric]).sort_values(["trial_id", "epoch"])
    best = scored.groupby("trial_id")[metric].transform("max" if mode == "max" else "min")
    return scored[scored[metric] == best].groupby("trial_id").tail(1)


def best_checkpoints(trials: pd.DataFrame, epochs: pd.DataFrame) -> dict[str, str]:
    """Each trial's checkpoint at its best epoch, where one was kept (the best ``keep_checkpoints``
    of a trial are)."""
    at_best = epochs.merge(
        trials[["trial_id", "best_epoch"]],
        left_on=["trial_id", "epoch"],
        right_on=["trial_id", "best_epoch"],
    )
    return {
        row.trial_id: row.checkpoint_path
        for row in at_best.itertuples()
        if isinstance(row.checkpoint_path, str) and row.checkpoint_path
    }


class ExperimentTables:
    """The per-epoch rows of every trial, and the tables and best trial derived from them."""

    def __init__(
        self,
        *,
        metric: str,
        mode: str,
        max_epochs: int,
        resources: Resources,
        params: SearchedParams,
        base: dict[str, Any],
    ):
        self.metric, self.mode, self.max_epochs = metric, mode, max_epochs
        self.resources = resources  # what each kind of trial holds: for gpu_hours
        self.params, self.base = (
            params,
            base,
        )  # searched parameters inactive in a trial are empty in the tables
        self.rows: dict[tuple[str, int], dict[str, Any]] = {}

    def add_result(self, trial_id: str, result: dict[str, Any]) -> None:
        if "epoch" not in result:
            return
        row = {"trial_id": trial_id, "epoch": int(result["epoch"])}
        row.update({name: float(result[name]) for name in METRIC_COLUMNS if name in result})
        row.update(
            {
                "time_total_s": float(result.get("time_total_s", math.nan)),
                "trial_s": self._trial_seconds(trial_id)
                + float(result.get("time_this_iter_s", 0.0)),
                "started_at_epoch": int(result.get("started_at_epoch", 0)),
                "feature_cache": float(result.get("feature_cache", 0.0)),
                "checkpoint_path": result.get("checkpoint_path"),
                "nodes": result.get("nodes"),
                "pids": result.get("pids"),
                "timestamp": float(result.get("timestamp", time.time())),
            }
        )
        # A trial retried from a checkpoint re-reports epochs; keep what the new report lacks.
        earlier = self.rows.get((trial_id, row["epoch"]), {})
        self.rows[(trial_id, row["epoch"])] = {
            **earlier,
            **{k: v for k, v in row.items() if v is not None},
        }

    def add_checkpoint(self, trial_id: str, epoch: int, path: str) -> None:
        """A checkpoint Ray Tune saved for a reported epoch (a head-only trial's; a TorchTrainer
        trial's are Ray Train's and come in its results as ``checkpoint_path``)."""
        if (trial_id, epoch) in self.rows:
            self.rows[(trial_id, epoch)]["checkpoint_path"] = path

    def _trial_seconds(self, trial_id: str) -> float:
        """Seconds the trial has run so far, over all its attempts. Tune's ``time_total_s`` restarts
        at 0 when ``--resume`` restores a trial, so the tables add up ``time_this_iter_s``
        instead."""
        spent = [row.get("trial_s") for (trial, _), row in self.rows.items() if trial == trial_id]
        return max((value for value in spent if value is not None and value == value), default=0.0)

    def add_rows(self, frame: pd.DataFrame) -> None:
        for row in frame.to_dict("records"):
            self.rows[(row["trial_id"], int(row["epoch"]))] = row

    def epochs_frame(self) -> pd.DataFrame:
        columns = [
            "trial_id",
            "epoch",
            *METRIC_COLUMNS,
            "time_total_s",
            "trial_s",
            "started_at_epoch",
            "feature_cache",
            "checkpoint_path",
            "nodes",
            "pids",
            "timestamp",
        ]
        frame = pd.DataFrame(list(self.rows.values()), columns=columns)
        return frame.sort_values(["trial_id", "epoch"], ignore_index=True)

    def trials_frame(self, trials: list[TrialState]) -> pd.DataFrame:
        # Rewritten whenever a trial ends: aggregated per trial in one pass, not filtered per trial.
        epochs = self.epochs_frame()
        by_trial = epochs.groupby("trial_id")
        epochs_run, wall_s = by_trial["epoch"].max(), by_trial["trial_s"].max().fillna(0.0)
        feature_cache, best_val_acc = (
            by_trial["feature_cache"].max().fillna(0),
            by_trial["val_acc"].max(),
        )
        nodes = by_trial["nodes"].agg(
            lambda column: ",".join(
                sorted({node for value in column.dropna() for node in str(value).split(",")})
            )
        )
        best_rows = best_epochs(epochs, metric=self.metric, mode=self.mode).set_index("trial_id")
        records = []
        for trial in trials:
            trial_id, run = trial.trial_id, int(epochs_run.get(trial.trial_id, 0))
            best = best_rows.loc[trial_id] if trial_id in best_rows.index else None
            spent = float(wall_s.get(trial_id, 0.0))
            record = {
                "trial_id": trial_id,
                "status": trial_status(trial.status, run, self.max_epochs),
                "epochs_run": run,
                "best_val_acc": float(best_val_acc.get(trial_id, math.nan))
                if best is not None
                else math.nan,
                f"best_{self.metric}": float(best[self.metric]) if best is not None else math.nan,
                "best_epoch": int(best["epoch"]) if best is not None else 0,
                "wall_s": spent,
                "gpu_hours": spent * self.resources.of_trial(trial.config).get("GPU", 0) / 3600,
                "node": nodes.get(trial_id, ""),
                "error": trial.error or "",
                # 1 when the head trained on cached backbone features (freeze: head)
                "feature_cache": int(feature_cache.get(trial_id, 0)),
            }
            active = self.params.active(trial.config)
            record.update(
                {
                    f"config.{key}": value if key in active or key not in self.params else None
                    for key, value in trial.config.items()
                    if key in TrainConfig.field_names()
                }
            )
            records.append(record)
        frame = pd.DataFrame(records)
        return frame if len(frame) else pd.DataFrame(columns=list(TRIAL_COLUMNS))

    def best(self, trials_frame: pd.DataFrame) -> dict[str, Any] | None:
        scored = ranked(trials_frame, metric=self.metric, mode=self.mode)
        if not len(scored):
            return None
        row = scored.iloc[0]
        column = f"best_{self.metric}"
        epochs = self.epochs_frame()
        at_best = epochs[
            (epochs["trial_id"] == row["trial_id"]) & (epochs["epoch"] == row["best_epoch"])
        ]
        config = config_of(row, self.base)
        return {
            "schema": SCHEMA_VERSION,
            "trial_id": row["trial_id"],
            "metric": self.metric,
            "mode": self.mode,
            self.metric: float(row[column]),
            "val_acc": float(row["best_val_acc"]),
            "epoch": int(row["best_epoch"]),
            "epochs_run": int(row["epochs_run"]),
            "status": row["status"],
            "config": config,
            "checkpoint": at_best["checkpoint_path"].iloc[0] if len(at_best) else None,
        }


class TrialState:
    """What the tables need of a trial: from Ray Tune's live Trial objects, or rebuilt later."""

    def __init__(
        self, trial_id: str, status: str, config: dict[str, Any], error: str | None = None
    ):
        self.trial_id, self.status, self.config, self.error = trial_id, status, config, error

    @classmethod
    def from_tune(cls, trial, status: str | None = None) -> TrialState:
        return cls(trial.trial_id, status or trial.status, dict(trial.config), _error_line(trial))


def _error_line(trial) -> str | None:
    """The last line of the trial's error (the exception and its message), if it failed."""
    path = getattr(trial, "error_file", None)
    if not path or not os.path.exists(path):
        return None
    lines = [
        line.strip() for line in Path(path).read_text(errors="replace").splitlines() if line.strip()
    ]
    return lines[-1][:500] if lines else None


# The statuses of trials that ended with whatever results they reported (not error, not unfinished).
ENDED_STATUSES = ("finished", "stopped_early", "stopped_by_budget")


def trial_status(tune_status: str, epochs_run: int, max_epochs: int) -> str:
    """Our name for a trial's state: ``finished`` and ``stopped_early`` (by ASHA) tell apart what
    Tune calls TERMINATED; ResultsRecorder's own INTERRUPTED and STOPPED_BY_BUDGET are lower-cased.
    A trial that the budget stopped after its last epoch (before it returned) has finished."""
    if tune_status in ("TERMINATED", "STOPPED_BY_BUDGET") and epochs_run >= max_epochs:
        return "finished"
    if tune_status == "TERMINATED":
        return "stopped_early"
    return {"ERROR": "error", "RUNNING": "running", "PENDING": "pending", "PAUSED": "paused"}.get(
        tune_status, tune_status.lower()
    )


def config_of(trial_row: pd.Series, base: dict[str, Any]) -> dict[str, Any]:
    """The TrainConfig dict of a trials.parquet row: its ``config.*`` columns, and for a searched
    parameter the trial left inactive (an empty cell) the search's ``base`` value, which it ran
    with."""
    values = {
        key.removeprefix("config."): plain(value)
        for key, value in trial_row.items()
        if key.startswith("config.") and not _empty(value)
    }
    return {**base, **values}


def _empty(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


class ResultsRecorder(Callback):
    """A Ray Tune callback on the driver that keeps trials.parquet, epochs.parquet and best.json
    current while the search runs, and the search's MLflow runs in step with them
    (``tracking``: ray_jobs/tracking.py). On ``--resume`` it starts from the epochs.parquet
    already written, so no row written before an interruption is lost."""

    MIN_INTERVAL_S = 2.0

    def __init__(
        self, store: ResultsStore, tables: ExperimentTables, tracking: SearchRuns | None = None
    ):
        self.store, self.tables, self.tracking = store, tables, tracking
        self._last_write = 0.0

    def setup(self, **info):
        # Runs at the start of every fit, including a restored one (whose callback was unpickled).
        self._unended: set[str] = set()
        # Trials Tune told this callback had ended (on_trial_complete), here or in an earlier run.
        self._completed: set[str] = set()
        if self.store.exists("epochs.parquet"):
            self.tables.add_rows(self.store.read_parquet("epochs.parquet"))
        if self.store.exists("trials.parquet"):
            earlier = self.store.read_parquet("trials.parquet")
            self._completed = set(
                earlier.loc[earlier["status"].isin(["finished", "stopped_early"]), "trial_id"]
            )
        if self.tracking:
            self.tracking.mark_running()

    def write(
        self, trials: list, final_status: dict[str, str] | None = None
    ) -> dict[str, Any] | None:
        """Rewrite the tables; ``final_status`` gives trials whose Tune status is about to
        change."""
        # Tune's stop_all (the search's budget: tuning.Budget, the only stopper) ends the running
        # and pending trials as TERMINATED without on_trial_complete: they are not ASHA's stops.
        by_budget = {
            t.trial_id: "STOPPED_BY_BUDGET"
            for t in trials
            if t.status == "TERMINATED" and t.trial_id not in self._completed
        }
        final_status = {**by_budget, **(final_status or {})}
        states = [TrialState.from_tune(t, final_status.get(t.trial_id)) for t in trials]
        trials_frame, epochs_frame = self.tables.trials_frame(states), self.tables.epochs_frame()
        self.store.write_parquet("epochs.parquet", epochs_frame)
        self.store.write_parquet("trials.parquet", trials_frame)
        best = self.tables.best(trials_frame)
        if best is not None:
            self.store.write_json("best.json", best)
        if self.tracking:
            self.tracking.log_tables(trials_frame, epochs_frame)
        self._last_write = time.monotonic()
        return best

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if result.get("checkpoint_path"):
            result = {**result, "checkpoint_path": self.store.uri_of(result["checkpoint_path"])}
        self.tables.add_result(trial.trial_id, result)
        if time.monotonic() - self._last_write >= self.MIN_INTERVAL_S:
            self.write(trials)

    def on_checkpoint(self, iteration, trials, trial, checkpoint, **info):
        if "epoch" in (trial.last_result or {}):
            self.tables.add_checkpoint(
                trial.trial_id, int(trial.last_result["epoch"]), self.store.uri_of(checkpoint.path)
            )

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._completed.add(trial.trial_id)
        self.write(trials, {trial.trial_id: "TERMINATED"})  # Tune sets the status after this call

    def on_trial_error(self, iteration, trials, trial, **info):
        self.write(trials, {trial.trial_id: "ERROR"})

    def on_step_end(self, iteration, trials, **info):
        # On Ctrl-C Tune ends its loop, saves the experiment, then stops the running trials as
        # TERMINATED without telling callbacks: the last step's statuses tell them from finished
        # ones.
        self._unended = {t.trial_id for t in trials if t.status not in ("TERMINATED", "ERROR")}

    def on_experiment_end(self, trials, **info):
        self.write(trials, {trial_id: "INTERRUPTED" for trial_id in self._unended})
