"""The Ray Tune pieces of a search: searcher, ASHA, run config, a fresh or restored Tuner, and
running one while telling a Ctrl-C apart from the end of the search."""

from __future__ import annotations

import os
import pickle
import signal
import time

import numpy as np
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch
from ray.tune.stopper import Stopper

from ray_jobs.console import ConsoleReporter
from ray_jobs.params import BRANCH_MARK
from ray_jobs.ray_internals import unreadable_saved_state
from ray_jobs.results import (
    ENDED_STATUSES,
    ExperimentTables,
    ResultsRecorder,
    ResultsStore,
    config_of,
    read_search,
)
from ray_jobs.space import Resources, SearchSettings, SearchSpace
from ray_jobs.study import Study
from ray_jobs.tracking import SearchRuns
from ray_jobs.trial import make_trainable, train_loop
from sketch_core.errors import SketchError

TUNE_FOLDER = "tune"


def build_tuner(
    space: SearchSpace,
    store: ResultsStore,
    *,
    resume: bool,
    verbose: bool = False,
    warm_start: list | None = None,
    tracking: SearchRuns | None = None,
) -> tune.Tuner:
    """A new Tuner for ``space``, or (``resume``) the one saved in ``store``, with its searcher,
    scheduler and callbacks as they were. ``verbose``: Tune's own progress output (configuration
    boxes, status tables) instead of only ``ConsoleReporter``'s lines. ``warm_start``: Optuna trials
    of earlier searches for the new study. ``tracking``: the new search's MLflow runs."""
    trainable = make_trainable(
        train_loop,
        resources=space.resources,
        keep_checkpoints=space.search.keep_checkpoints,
        metric=space.search.metric,
        mode=space.search.mode,
    )
    if resume:
        # The restored Tuner brings back its searcher, scheduler and callbacks (ResultsRecorder
        # re-reads epochs.parquet in setup()); unfinished trials restart from their checkpoints.
        # param_space: the base the search began with. When Tune cannot read its saved state (beyond
        # what check_saved_state reads first), it logs the failure and starts the search again from
        # the param_space given here: without one, its trials would hold the searched values alone.
        base = read_search(store)["base"]
        try:
            return tune.Tuner.restore(
                store.fs_path(TUNE_FOLDER),
                trainable=trainable,
                param_space=base,
                resume_unfinished=True,
                resume_errored=False,
                restart_errored=False,
                storage_filesystem=store.fs,
            )
        except (
            Exception
        ) as exc:  # a truncated or foreign state file: pickle, JSON and pyarrow errors alike
            raise SketchError(
                f"{store.uri(TUNE_FOLDER)}: cannot restore the search from its saved state "
                f"({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''})"
            ) from None
    tables = ExperimentTables(
        metric=space.search.metric,
        mode=space.search.mode,
        max_epochs=space.scheduler.max_epochs,
        resources=space.resources,
        params=space.params,
        base=space.base,
    )
    return tune.Tuner(
        trainable,
        param_space=space.param_space(),
        tune_config=search_config(space, study=Study(store), warm_start=warm_start),
        run_config=tune.RunConfig(
            name=TUNE_FOLDER,
            storage_path=store.fs_path(),
            storage_filesystem=store.fs,
            **retries_and_checkpoints(
                max_failures=space.search.max_failures,
                keep_checkpoints=space.search.keep_checkpoints,
                metric=space.search.metric,
                mode=space.search.mode,
            ),
            callbacks=[
                ResultsRecorder(store, tables, tracking),
                ConsoleReporter(
                    searched=space.params,
                    metric=space.search.metric,
                    mode=space.search.mode,
                    max_epochs=space.scheduler.max_epochs,
                ),
            ],
            stop=Budget(space.search, space.resources, store)
            if space.search.budget_hours or space.search.budget_gpu_hours
            else None,
            verbose=2 if verbose else 0,
        ),
    )


def search_config(
    space: SearchSpace, *, study: Study, warm_start: list | None = None
) -> tune.TuneConfig:
    """How Tune runs a new search of ``space``: its searcher (with the Optuna ``study``, given the
    ``warm_start`` trials), the number of trials, ``search.max_concurrent`` of them at once (Tune
    limits a Searcher itself; every searcher here is one), ASHA."""
    searcher, num_samples = _searcher(space, study=study, warm_start=warm_start)
    return tune.TuneConfig(
        metric=space.search.metric,
        mode=space.search.mode,
        num_samples=num_samples,
        max_concurrent_trials=space.search.max_concurrent,
        search_alg=searcher,
        scheduler=_scheduler(space),
        reuse_actors=True,  # head-only trials only: ray_internals.OwnRequest
    )


class Budget(Stopper):
    """``search.budget_gpu_hours`` and ``search.budget_hours`` cover the search and its final fit:
    once the search has spent all of either but ``search.final_fit_share`` (``ended_by``), no
    trial starts and the running ones stop (Tune's ``stop_all``); the search then ends as usual.
    Both count over every run of the search: what runs before this one spent is in search.json
    (``spent``, which tune.py updates after each run). A restored Tuner brings back the stopper it
    was built with, so this one reads that when its run starts."""

    def __init__(self, settings: SearchSettings, resources: Resources, store: ResultsStore):
        self.settings, self.resources, self.store = settings, resources, store
        self.earlier: dict[str, float] = {}
        self._started_at: float | None = None  # this run's clock starts at its first check
        self._gpu_seconds = 0.0

    def __call__(self, trial_id: str, result: dict) -> bool:
        gpus = self.resources.of_trial(result["config"]).get("GPU", 0)
        self._gpu_seconds += float(result.get("time_this_iter_s") or 0.0) * gpus
        return False

    def stop_all(self) -> bool:
        if self._started_at is None:
            self._started_at = time.monotonic()
            self.earlier = self.store.read_json("search.json").get("spent", {})
        return ended_by(self.settings, self.spent()) is not None

    def spent(self) -> dict[str, float]:
        elapsed = time.monotonic() - self._started_at if self._started_at is not None else 0.0
        return {
            "hours": self.earlier.get("hours", 0.0) + elapsed / 3600,
            "gpu_hours": self.earlier.get("gpu_hours", 0.0) + self._gpu_seconds / 3600,
        }


def ended_by(settings: SearchSettings, spent: dict[str, float]) -> str | None:
    """The budget whose share for the search (``search_budget``) ``spent`` used up, if any."""
    for name, used in (("budget_gpu_hours", spent["gpu_hours"]), ("budget_hours", spent["hours"])):
        if getattr(settings, name) > 0 and used >= search_budget(settings, name):
            return name
    return None


def search_budget(settings: SearchSettings, name: str) -> float:
    """What the search may spend of budget ``name``: all but the final fit's share."""
    return getattr(settings, name) * (1 - settings.final_fit_share)


def budget_split(settings: SearchSettings) -> str | None:
    """The line that says how the search's budgets are split, and why; None without a budget."""
    parts = [
        f"{getattr(settings, name):g} {unit} (the search {search_budget(settings, name):.3g})"
        for name, unit in (("budget_hours", "hours"), ("budget_gpu_hours", "GPU-hours"))
        if getattr(settings, name) > 0
    ]
    if not parts:
        return None
    return (
        f"budget: {' and '.join(parts)}, for the search and its final fit: "
        f"{settings.final_fit_share:.0%} (search.final_fit_share) is kept for final_fit.py. "
        "Its --from-trials trains nothing, it predicts with the search's models, and needs far "
        "less; a refit (--best, --folds) needs about one or K trials' training: raise the share"
    )


def retries_and_checkpoints(
    *, max_failures: int, keep_checkpoints: int, metric: str, mode: str
) -> dict:
    """RunConfig arguments: Tune retries a failed trial of either kind from its last checkpoint, and
    keeps the best ``keep_checkpoints`` of a head-only trial (a TorchTrainer trial's checkpoints
    are Ray Train's, kept by its own CheckpointConfig)."""
    # With num_to_keep set, Tune snapshots the experiment every num_to_keep checkpoints of a trial
    # and warns when that comes often: head-only trials checkpoint every epoch, milliseconds apart,
    # by design, so the warning would only be noise on the console.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    return {
        "failure_config": tune.FailureConfig(max_failures=max_failures),
        "checkpoint_config": tune.CheckpointConfig(
            num_to_keep=keep_checkpoints,
            checkpoint_score_attribute=metric,
            checkpoint_score_order=mode,
        ),
    }


def check_saved_state(store: ResultsStore) -> None:
    """One error line unless Tune can restore the search in ``store`` as it was left.

    Tune saves its state locally, then uploads the files one by one in the background; a kill -9
    amid an upload can leave one cut short or missing. Restoring from such files, Tune logs "Failed
    to restore the run state" and starts the search again from nothing (or, without the searcher's
    files, makes no new trial), and the tables would lose the trials already run."""
    problem = unreadable_saved_state(
        store.list_names(TUNE_FOLDER), lambda name: store.read_bytes(f"{TUNE_FOLDER}/{name}")
    )
    if problem:
        raise SketchError(
            f"{store.uri(TUNE_FOLDER)}: cannot resume: {problem}, as when the driver is killed "
            "while Ray Tune saves the search; start a new search that learns from this one's "
            "trials: "
            f"--name NEW --warm-start {store.experiment}"
        )


def _searcher(space: SearchSpace, *, study: Study, warm_start: list | None = None):
    """The searcher and the number of trials it makes. Every searcher draws with the same walk over
    the parameters and their branches (ray_jobs/params.py) and starts with ``search.start_from``."""
    if space.search.searcher == "optuna":
        import optuna

        storage = study.storage()
        if (
            warm_start
        ):  # completed trials of earlier searches, in the study before the searcher opens it
            optuna.create_study(
                storage=storage,
                study_name=space.experiment,
                load_if_exists=True,
                direction="maximize" if space.search.mode == "max" else "minimize",
            ).add_trials(warm_start)
        # The searcher is pickled into Tune's experiment state with its storage, so --resume goes on
        # with the same study in the same file.
        searcher = BranchedOptunaSearch(
            study,
            space=space.params.suggest,
            metric=space.search.metric,
            mode=space.search.mode,
            sampler=optuna.samplers.TPESampler(
                n_startup_trials=space.search.startup_trials, seed=space.search.seed
            ),
            storage=storage,
            study_name=space.experiment,
            points_to_evaluate=[
                space.params.optuna_trial_params({**space.base, **point})[0]
                for point in space.start_from
            ]
            or None,
        )
        return searcher, space.search.num_samples + len(space.start_from)
    # Random and grid: every trial drawn up front (seeded), run in order.
    rng = np.random.default_rng(space.search.seed)
    trials = [
        *space.start_from,
        *(values for _ in range(space.search.num_samples) for values in space.params.draw(rng)),
    ]
    return DrawnTrials(trials, metric=space.search.metric, mode=space.search.mode), len(trials)


class DrawnTrials(Searcher):
    """Trials drawn before the search (random and grid searches), handed out in order. A Searcher,
    not Tune's BasicVariantGenerator with points_to_evaluate: a restored generator looks each
    point's keys up in a search-space spec that --resume can bring back without them (KeyError)."""

    def __init__(self, trials: list[dict], *, metric: str, mode: str):
        super().__init__(metric=metric, mode=mode)
        self.trials, self.handed_out = list(trials), 0

    def suggest(self, trial_id: str):
        if self.handed_out >= len(self.trials):
            return Searcher.FINISHED
        self.handed_out += 1
        return dict(self.trials[self.handed_out - 1])

    def on_trial_complete(
        self, trial_id: str, result: dict | None = None, error: bool = False
    ) -> None:
        pass  # nothing to learn: the trials were drawn up front

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as file:
            pickle.dump(self.__dict__, file)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as file:
            self.__dict__.update(pickle.load(file))


class BranchedOptunaSearch(OptunaSearch):
    """Ray Tune's OptunaSearch for a define-by-run space whose parameters may have several
    branches, each a parameter of its own in the study (``lr|freeze=head``): the trial's config gets
    the TrainConfig names alone (OptunaSearch also adds every name the study suggested). Whenever
    Tune saves it, the study is uploaded first (results on object storage: ray_jobs/study.py), so
    the experiment folder's journal holds every trial the saved searcher knows."""

    def __init__(self, study: Study, **options):
        self.study = study
        super().__init__(**options)

    def save(self, checkpoint_path: str) -> None:
        self.study.upload()
        super().save(checkpoint_path)

    def suggest(self, trial_id: str):
        suggested = super().suggest(trial_id)
        return suggested and {
            key: value for key, value in suggested.items() if BRANCH_MARK not in key
        }


def warm_start_trials(space: SearchSpace, stores: list[ResultsStore]) -> list:
    """The finished and early-stopped trials of earlier experiments that this space could have
    drawn, as completed Optuna trials with the result the searcher would have been told (the metric
    at the trial's last epoch, as OptunaSearch records). Says how many each experiment gave."""
    import optuna

    trials = []
    for store in stores:
        search = read_search(store)
        if search["metric"] != space.search.metric:
            raise SketchError(
                f"--warm-start {store.uri()}: that search optimised {search['metric']}, "
                f"this one {space.search.metric}"
            )
        table = store.read_parquet("trials.parquet")
        epochs = (
            store.read_parquet("epochs.parquet")
            .dropna(subset=[space.search.metric])
            .sort_values("epoch")
        )
        curves = dict(tuple(epochs.groupby("trial_id")))
        ended = table[table["status"].isin(ENDED_STATUSES)]
        outside = unscored = 0
        for _, row in ended.iterrows():
            curve = curves.get(row["trial_id"])
            if curve is None:  # stopped (by a budget, say) before its first epoch ended
                unscored += 1
                continue
            config = config_of(row, search["base"])
            if space.why_not_drawn(config):
                outside += 1
                continue
            params, distributions = space.params.optuna_trial_params(config)
            trials.append(
                optuna.trial.create_trial(
                    params=params,
                    distributions=distributions,
                    value=float(curve[space.search.metric].iloc[-1]),
                    intermediate_values=dict(
                        zip(curve["epoch"].astype(int), curve[space.search.metric].astype(float))
                    ),
                    user_attrs={"warm_start": f"{store.experiment}/{row['trial_id']}"},
                )
            )
        # Both reasons to skip, always: a user sees at once how many trials were left out, and why.
        print(
            f"warm start: {len(ended) - outside - unscored} trial(s) of {store.uri()}; "
            f"{outside} outside this space skipped; {unscored} stopped before a result skipped",
            flush=True,
        )
    return trials


def _scheduler(space: SearchSpace):
    if space.scheduler.type == "none":
        return FIFOScheduler()
    # The reported epoch, not training_iteration: the latter restarts at 0 after a restore.
    return ASHAScheduler(
        time_attr="epoch",
        max_t=space.scheduler.max_epochs,
        grace_period=space.scheduler.grace_period,
        reduction_factor=space.scheduler.reduction_factor,
    )


def _raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt


def fit_noting_ctrl_c(tuner: tune.Tuner):
    """``tuner.fit()``, and whether Ctrl-C ended it.

    Ray Tune takes the first SIGINT itself: it stops starting trials, saves the experiment and
    returns as if the search had ended, and its handler puts back the handler it found. So a
    handler of ours installed before ``fit`` is back in place afterwards exactly when Ctrl-C
    came, whether a trial was running then or not (between two trials none is)."""
    previous = signal.signal(signal.SIGINT, _raise_keyboard_interrupt)
    try:
        results = tuner.fit()
        tune_catches_sigint = not int(os.environ.get("TUNE_DISABLE_SIGINT_HANDLER", "0"))
        interrupted = (
            tune_catches_sigint and signal.getsignal(signal.SIGINT) is _raise_keyboard_interrupt
        )
    finally:
        signal.signal(signal.SIGINT, previous)
    return results, interrupted
