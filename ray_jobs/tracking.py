"""MLflow tracking of searches and refits, optional: ``--mlflow [URI]`` or ``MLFLOW_TRACKING_URI``.

A search is one MLflow parent run, in the MLflow experiment of the search's name, with a child run
per trial: the values it searched as params, every epoch's metrics at ``step=epoch``, its status
and GPU-hours as tags (and as MLflow's run status: FINISHED, FAILED, KILLED, RUNNING). The parent
has the search's settings as params, its best result as metrics, and the report's files,
search.json and best.json as artifacts. A refit is a run under the search's parent with its
submission and fit.json.

Everything is logged on the driver from the tables that ``ResultsRecorder`` writes, so both kinds
of trial are logged alike and the runs agree with trials.parquet and epochs.parquet. Ray's
``MLflowLoggerCallback`` does not fit: it starts a second run for every trial that a ``--resume``
restores (it keeps its runs in memory), logs at ``step=training_iteration``, which Tune restarts at
0 on ``--resume``, logs the whole configuration rather than the searched values, and knows Tune's
statuses but not ours (stopped_early, stopped_by_budget, interrupted) nor GPU-hours.

Credentials stay in the environment, as MLflow reads them (``MLFLOW_TRACKING_USERNAME`` and
``MLFLOW_TRACKING_PASSWORD``, or ``MLFLOW_TRACKING_TOKEN``): the tracking URI is kept in
search.json and Tune's state, so one with credentials in it is refused.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from functools import cached_property
from pathlib import Path
from typing import Any

import pandas as pd

from ray_jobs.cli import local_path
from ray_jobs.results import METRIC_COLUMNS, ResultsStore, carries_credentials, config_of
from sketch_core.config import TrainConfig
from sketch_core.errors import SketchError

# The local store beside the results when --mlflow names none (MLflow's own local default is
# SQLite; its file store, ./mlruns, is refused by MLflow 3 unless MLFLOW_ALLOW_FILE_STORE is set).
LOCAL_STORE, LOCAL_ARTIFACTS = "mlflow.db", "mlartifacts"
# MLflow's run status for each of ours (results.trial_status).
RUN_STATUS = {
    "finished": "FINISHED",
    "stopped_early": "FINISHED",
    "stopped_by_budget": "FINISHED",
    "error": "FAILED",
    "interrupted": "KILLED",
}
TRIAL_TAG, RESULTS_TAG, KIND_TAG, PARENT_TAG = (
    "sketch.trial_id",
    "sketch.results",
    "sketch.kind",
    "mlflow.parentRunId",
)


def tracking_uri(option: str | None, results: str) -> str | None:
    """The tracking URI a command logs to: ``--mlflow URI``; ``--mlflow`` alone (``option`` "")
    ``MLFLOW_TRACKING_URI``, else a SQLite store beside the results; no ``--mlflow``:
    ``MLFLOW_TRACKING_URI`` if set, else None (no tracking)."""
    from_environment = os.environ.get("MLFLOW_TRACKING_URI") or None
    if option is None:
        uri = from_environment
    else:
        uri = option or from_environment or _beside(results)
    return uri and _checked(uri)


def search_runs(
    option: str | None, store: ResultsStore, search: dict[str, Any], *, resume: bool
) -> SearchRuns | None:
    """The MLflow runs of the search ``search`` (search.json's content) in ``store`` (None: not
    tracked), their store checked before Ray starts: a new search's from ``--mlflow`` or
    ``MLFLOW_TRACKING_URI``; a resumed one's from search.json, the tracking it began with."""
    saved = search.get("mlflow") or {}
    uri = saved.get("tracking_uri") if resume else tracking_uri(option, store.root)
    if resume and option and _checked(option) != uri:
        raise SketchError(
            f"--mlflow {option}: a resumed search keeps the MLflow tracking it began with "
            f"({uri or 'none'})"
        )
    if not uri:
        return None
    runs = SearchRuns(uri, store.experiment, search, run_id=saved.get("run_id", ""))
    runs.check()
    return runs


def refit_tracking(option: str | None, store: ResultsStore, search: dict[str, Any]) -> str | None:
    """Where a refit is logged (None: nowhere), checked before Ray starts: ``--mlflow URI``, else
    where its search was logged, else as ``tracking_uri`` says."""
    saved = (search.get("mlflow") or {}).get("tracking_uri")
    uri = _checked(option) if option else saved or tracking_uri(option, store.root)
    if uri:
        Tracking(uri, store.experiment).check()
    return uri


def _beside(results: str) -> str:
    if "://" in results:
        raise SketchError(
            f"--mlflow: results on object storage ({results}) have no folder for a local MLflow "
            "store; give a tracking URI: an MLflow server (http://...) or sqlite:///PATH"
        )
    return "sqlite:///" + str(Path(local_path(results)) / LOCAL_STORE)


def _checked(uri: str) -> str:
    """``uri`` with a SQLite file made absolute (final_fit.py may run elsewhere); one error line if
    it carries credentials."""
    if carries_credentials(uri):
        raise SketchError(
            "--mlflow: the tracking URI carries credentials, which would be written into "
            "search.json and Ray Tune's state; give them in the environment instead "
            "(MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, or MLFLOW_TRACKING_TOKEN)"
        )
    if uri.startswith("sqlite:///"):
        return "sqlite:///" + local_path(uri.removeprefix("sqlite:///"))
    return uri


def _quiet_mlflow() -> None:
    """MLflow's INFO lines (database set-up, 'View run ... at') stay off the console."""
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)


class Tracking:
    """One experiment's runs in an MLflow tracking store. The client is made on first use and
    the object pickles (with ``ResultsRecorder``, into Tune's saved state) as its settings
    alone."""

    SETTINGS = ("uri", "experiment")

    def __init__(self, uri: str, experiment: str):
        self.uri, self.experiment = uri, experiment

    def __getstate__(self) -> dict[str, Any]:
        return {key: value for key, value in self.__dict__.items() if key in self.SETTINGS}

    @cached_property
    def client(self):
        from mlflow import MlflowClient

        _quiet_mlflow()  # after the import, which sets MLflow's own level
        return MlflowClient(self.uri)

    @cached_property
    def experiment_id(self) -> str:
        found = self.client.get_experiment_by_name(self.experiment)
        if found is not None:
            return found.experiment_id
        return self.client.create_experiment(self.experiment, artifact_location=self._artifacts())

    def _artifacts(self) -> str | None:
        """Artifacts of a SQLite store go beside its file (MLflow's default is ./mlruns of
        wherever the command runs); a server decides for itself."""
        if self.uri.startswith("sqlite:///"):
            return str(Path(self.uri.removeprefix("sqlite:///")).parent / LOCAL_ARTIFACTS)
        return None

    def check(self) -> None:
        """One error line unless the store answers (before Ray starts; it reads, writes nothing)."""
        try:
            self.client.search_experiments(max_results=1)
        except Exception as exc:  # MLflow's, requests' and SQLAlchemy's errors alike
            message = " ".join(str(exc).split())[:300]
            raise SketchError(
                f"--mlflow {self.uri}: the tracking store refused ({message})"
            ) from None

    def start_run(self, name: str, *, tags: dict[str, str], params: dict[str, Any]) -> str:
        from mlflow.entities import Param

        run = self.client.create_run(self.experiment_id, run_name=name, tags=tags)
        self.client.log_batch(
            run.info.run_id, params=[Param(key, _text(value)) for key, value in params.items()]
        )
        return run.info.run_id

    def log_files(self, run_id: str, store: ResultsStore, names: dict[str, str]) -> None:
        """Files of the experiment folder (``name``: the artifact folder, "" for the top) as
        artifacts of ``run_id``, wherever the folder lives."""
        with tempfile.TemporaryDirectory() as folder:
            for name, artifact_folder in names.items():
                local = Path(folder, artifact_folder or ".", name.rsplit("/", 1)[-1])
                local.parent.mkdir(parents=True, exist_ok=True)
                local.write_bytes(store.read_bytes(name))
            self.client.log_artifacts(run_id, folder)


class SearchRuns(Tracking):
    """A search's parent run and its trials' child runs, kept in step with the tables. Runs found
    in the store are reused, so a ``--resume`` adds to the runs of the search it continues."""

    SETTINGS = ("uri", "experiment", "run_id", "searched", "base")

    def __init__(self, uri: str, experiment: str, search: dict[str, Any], *, run_id: str = ""):
        super().__init__(uri, experiment)
        self.searched, self.base, self.run_id = list(search["searched"]), search["base"], run_id

    def start_search(self, search: dict[str, Any], results_uri: str) -> dict[str, str]:
        """The parent run of a new search; returns what search.json keeps of it."""
        self.run_id = self.start_run(
            search["experiment"],
            tags={KIND_TAG: "search", RESULTS_TAG: results_uri},
            params={
                "results": results_uri,
                "searched": ",".join(search["searched"]),
                **{
                    key: search[key]
                    for key in ("space_file", "data_dir", "metric", "mode", "max_epochs")
                },
                "num_samples": search["num_samples"],
                "budget_hours": search["budget"]["hours"],
                "budget_gpu_hours": search["budget"]["gpu_hours"],
            },
        )
        return self.saved()

    def saved(self) -> dict[str, str]:
        return {
            "tracking_uri": self.uri,
            "experiment_id": self.experiment_id,
            "run_id": self.run_id,
        }

    @cached_property
    def _children(self) -> dict[str, str]:
        """trial_id -> child run, from the store (a resumed search has some already)."""
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{PARENT_TAG}` = '{self.run_id}'",
            max_results=50000,  # the most a store answers at once
        )
        return {
            run.data.tags[TRIAL_TAG]: run.info.run_id for run in runs if TRIAL_TAG in run.data.tags
        }

    @cached_property
    def _logged(self) -> dict[str, set[int]]:
        """The epochs already logged of each trial (steps of val_acc, which every epoch has)."""
        return {
            trial_id: {int(m.step) for m in self.client.get_metric_history(run_id, "val_acc")}
            for trial_id, run_id in self._children.items()
        }

    @cached_property
    def _tagged(self) -> dict[str, tuple]:
        """The status and GPU-hours each trial's run was last tagged with, by this process."""
        return {}

    def mark_running(self) -> None:
        """The parent runs (again, in a resumed search: it was left KILLED or RUNNING)."""
        self.client.update_run(self.run_id, status="RUNNING")

    def log_tables(self, trials: pd.DataFrame, epochs: pd.DataFrame) -> None:
        """Child runs for new trials, the epochs not logged yet, changed statuses and GPU-hours.
        A store that fails is one warning line: the search goes on, the tables keep every result,
        and what was not logged is logged at the next call."""
        try:
            self._log_tables(trials, epochs)
        except Exception as exc:  # MLflow's, requests' and SQLAlchemy's errors alike
            print(
                f"warning: MLflow logging failed ({' '.join(str(exc).split())[:200]})", flush=True
            )

    def _drop_lost_trials(self, known: set[str]) -> None:
        """Once per process, at its first tables (which hold every trial Tune restored): the runs
        of trials Tune lost go to MLflow's trash. A driver killed before Tune saved its state
        loses the trials it had just drawn, and draws others on --resume."""
        if getattr(self, "_lost_dropped", False):  # not pickled: set again after a restore
            return
        for trial_id in [trial_id for trial_id in self._children if trial_id not in known]:
            self.client.delete_run(self._children.pop(trial_id))
            self._logged.pop(trial_id, None)
        self._lost_dropped = True

    def _log_tables(self, trials: pd.DataFrame, epochs: pd.DataFrame) -> None:
        from mlflow.entities import Metric, RunTag

        self._drop_lost_trials(set(trials["trial_id"]))
        by_trial = dict(tuple(epochs.groupby("trial_id")))
        for trial in trials.to_dict("records"):
            trial_id = trial["trial_id"]
            if trial_id not in self._children:
                config = TrainConfig.from_dict(config_of(trial, self.base)).to_dict()  # typed
                self._children[trial_id] = self.start_run(
                    trial_id,
                    tags={PARENT_TAG: self.run_id, TRIAL_TAG: trial_id, KIND_TAG: "trial"},
                    params={
                        name: config[name]
                        for name in self.searched
                        if not _empty(trial.get(f"config.{name}"))  # drawn, not left inactive
                    },
                )
                self._logged[trial_id] = set()
            run_id = self._children[trial_id]
            rows = by_trial.get(trial_id, epochs.iloc[:0])
            rows = rows[~rows["epoch"].isin(self._logged[trial_id])]
            metrics = [
                Metric(name, float(row[name]), int(row["timestamp"] * 1000), int(row["epoch"]))
                for row in rows.to_dict("records")
                for name in METRIC_COLUMNS
                if not _empty(row.get(name))
            ]
            for start in range(0, len(metrics), 1000):  # MLflow takes 1000 per batch
                self.client.log_batch(run_id, metrics=metrics[start : start + 1000])
            self._logged[trial_id] |= set(rows["epoch"].astype(int))
            state = (trial["status"], round(float(trial["gpu_hours"]), 6))
            if self._tagged.get(trial_id) != state:
                self.client.log_batch(
                    run_id,
                    tags=[RunTag("status", state[0]), RunTag("gpu_hours", _text(state[1]))],
                )
                if trial["status"] in RUN_STATUS:
                    self.client.set_terminated(run_id, RUN_STATUS[trial["status"]])
                else:
                    self.client.update_run(run_id, status="RUNNING")
                self._tagged[trial_id] = state

    def finish(self, store: ResultsStore, *, interrupted: bool) -> None:
        """After a run of the search: its best result, the report's files, search.json and
        best.json on the parent, which ends KILLED after a Ctrl-C and FINISHED otherwise."""
        from mlflow.entities import Metric, RunTag

        search = store.read_json("search.json")
        now = int(time.time() * 1000)
        if store.exists("best.json"):
            best = store.read_json("best.json")
            metric = best["metric"]
            self.client.log_batch(
                self.run_id,
                metrics=[
                    Metric(f"best_{name}", float(best[name]), now, 0)
                    for name in dict.fromkeys(("val_acc", metric))
                ],
                tags=[RunTag("best_trial", best["trial_id"])],
            )
        if search.get("ended_by"):
            self.client.set_tag(self.run_id, "ended_by", search["ended_by"])
        report = {f"report/{name}": "report" for name in store.list_names("report")}
        present = {name: "" for name in ("search.json", "best.json") if store.exists(name)}
        self.log_files(self.run_id, store, {**report, **present})
        self.client.set_terminated(self.run_id, "KILLED" if interrupted else "FINISHED")


def log_refit(
    uri: str,
    store: ResultsStore,
    search: dict[str, Any],
    *,
    fit: dict[str, Any],
    folder: str,
    submission: str,
) -> str:
    """A refit as a run (under its search's parent run when the search was tracked in the same
    store): its settings and source trials as params, its accuracies as metrics, the submission
    and fit.json as artifacts. Returns the run's ID."""
    from mlflow.entities import Metric

    searched = search.get("mlflow") or {}
    parent = searched.get("run_id") if searched.get("tracking_uri") == uri else None
    tracking = Tracking(uri, store.experiment)
    run_id = tracking.start_run(
        f"refit {folder.rsplit('/', 1)[-1]}",
        tags={
            KIND_TAG: "refit",
            RESULTS_TAG: store.uri(),
            **({PARENT_TAG: parent} if parent else {}),
        },
        params={
            **{key: fit[key] for key in ("top_k", "folds", "tta")},
            "ensemble": fit["ensemble"]["method"],
            "source_trials": ",".join(dict.fromkeys(m["source_trial"] for m in fit["models"])),
            "epochs": ",".join(str(m["epochs"]) for m in fit["models"]),
        },
    )
    now = int(time.time() * 1000)
    scores = {f"test_accuracy/{name}": value for name, value in fit["test_accuracy"].items()}
    if fit["out_of_fold"]:
        estimate = fit["out_of_fold"]["estimate"]
        scores |= {
            "cv_accuracy": estimate["accuracy"],
            "cv_standard_error": estimate["standard_error"],
        }
    tracking.client.log_batch(
        run_id, metrics=[Metric(k, float(v), now, 0) for k, v in scores.items()]
    )
    tracking.log_files(run_id, store, {submission: "", f"{folder}/fit.json": ""})
    tracking.client.set_terminated(run_id, "FINISHED")
    return run_id


def _empty(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _text(value: Any) -> str:
    return str(value.item() if hasattr(value, "item") else value)
