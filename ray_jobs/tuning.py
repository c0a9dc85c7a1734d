"""The Ray Tune pieces of a search: searcher, ASHA, run config, a fresh or restored Tuner, and
running one while telling a Ctrl-C apart from the end of the search."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search.basic_variant import BasicVariantGenerator

from sketch_core.errors import SketchError
from ray_jobs.console import ConsoleReporter
from ray_jobs.results import ExperimentTables, ResultsRecorder, ResultsStore
from ray_jobs.space import SearchSpace
from ray_jobs.trial import make_trainable, train_loop

TUNE_FOLDER = "tune"
# The Optuna study, stored as the search runs so that optuna-dashboard can show it live.
STUDY_FILE = "study.journal"


def build_tuner(space: SearchSpace, store: ResultsStore, *, resume: bool, verbose: bool = False) -> tune.Tuner:
    """A new Tuner for ``space``, or (``resume``) the one saved in ``store``, with its searcher,
    scheduler and callbacks as they were. ``verbose``: Tune's own progress output (configuration
    boxes, status tables) instead of only ``ConsoleReporter``'s lines."""
    trainable = make_trainable(train_loop, resources=space.resources, keep_checkpoints=space.search.keep_checkpoints,
                               metric=space.search.metric, mode=space.search.mode)
    if resume:
        # The restored Tuner brings back its searcher, scheduler and callbacks (ResultsRecorder
        # re-reads epochs.parquet in setup()); unfinished trials restart from their checkpoints.
        try:
            return tune.Tuner.restore(store.uri(TUNE_FOLDER), trainable=trainable, resume_unfinished=True,
                                      resume_errored=False, restart_errored=False,
                                      storage_filesystem=store.fs if store.scheme else None)
        except Exception as exc:  # a truncated or foreign state file: pickle, JSON and pyarrow errors alike
            raise SketchError(f"{store.uri(TUNE_FOLDER)}: cannot restore the search from its saved state "
                              f"({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''})") from None
    tables = ExperimentTables(metric=space.search.metric, mode=space.search.mode,
                              max_epochs=space.scheduler.max_epochs, resources=space.resources)
    return tune.Tuner(
        trainable,
        param_space=space.param_space(),
        tune_config=tune.TuneConfig(
            metric=space.search.metric,
            mode=space.search.mode,
            num_samples=space.search.num_samples,
            max_concurrent_trials=space.search.max_concurrent,
            search_alg=_searcher(space, study_file=study_file(store)),
            scheduler=_scheduler(space),
            reuse_actors=True,  # head-only trials only: trial.OwnRequest
        ),
        run_config=tune.RunConfig(
            name=TUNE_FOLDER,
            storage_path=store.uri(),
            storage_filesystem=store.fs if store.scheme else None,
            **retries_and_checkpoints(max_failures=space.search.max_failures,
                                      keep_checkpoints=space.search.keep_checkpoints, metric=space.search.metric,
                                      mode=space.search.mode),
            callbacks=[ResultsRecorder(store, tables),
                       ConsoleReporter(searched=sorted(space.params), metric=space.search.metric,
                                       mode=space.search.mode, max_epochs=space.scheduler.max_epochs)],
            verbose=2 if verbose else 0,
        ),
    )


def retries_and_checkpoints(*, max_failures: int, keep_checkpoints: int, metric: str, mode: str) -> dict:
    """RunConfig arguments: Tune retries a failed trial of either kind from its last checkpoint, and
    keeps the best ``keep_checkpoints`` of a head-only trial (a TorchTrainer trial's checkpoints
    are Ray Train's, kept by its own CheckpointConfig)."""
    # With num_to_keep set, Tune snapshots the experiment every num_to_keep checkpoints of a trial
    # and warns when that comes often: head-only trials checkpoint every epoch, milliseconds apart,
    # by design, so the warning would only be noise on the console.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    return {"failure_config": tune.FailureConfig(max_failures=max_failures),
            "checkpoint_config": tune.CheckpointConfig(num_to_keep=keep_checkpoints, checkpoint_score_attribute=metric,
                                                       checkpoint_score_order=mode)}


def study_file(store: ResultsStore) -> str | None:
    """Where the Optuna study lives: a journal file in the experiment folder, which Optuna appends
    to safely on local and shared (NFS) file systems; None (in memory) for object storage."""
    return None if store.scheme else store.uri(STUDY_FILE)


def _searcher(space: SearchSpace, *, study_file: str | None = None):
    if space.search.searcher == "optuna":
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend
        from ray.tune.search.optuna import OptunaSearch

        storage = None
        if study_file:
            Path(study_file).parent.mkdir(parents=True, exist_ok=True)
            storage = JournalStorage(JournalFileBackend(study_file))
        # The searcher is pickled into Tune's experiment state with its storage, so --resume goes on
        # with the same study in the same file.
        return OptunaSearch(seed=space.search.seed, storage=storage, study_name=space.experiment)
    # Tune applies max_concurrent_trials to Searchers only: a generator passed in must carry it.
    return BasicVariantGenerator(random_state=space.search.seed, max_concurrent=space.search.max_concurrent)


def _scheduler(space: SearchSpace):
    if space.scheduler.type == "none":
        return FIFOScheduler()
    # The reported epoch, not training_iteration: the latter restarts at 0 after a restore.
    return ASHAScheduler(time_attr="epoch", max_t=space.scheduler.max_epochs,
                         grace_period=space.scheduler.grace_period,
                         reduction_factor=space.scheduler.reduction_factor)


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
        interrupted = tune_catches_sigint and signal.getsignal(signal.SIGINT) is _raise_keyboard_interrupt
    finally:
        signal.signal(signal.SIGINT, previous)
    return results, interrupted
