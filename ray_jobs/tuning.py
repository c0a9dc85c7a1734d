"""The Ray Tune pieces of a search: searcher, ASHA, run config, and a fresh or restored Tuner."""

from __future__ import annotations

from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search.basic_variant import BasicVariantGenerator

from ray_jobs.results import ExperimentTables, ResultsRecorder, ResultsStore
from ray_jobs.space import SearchSpace
from ray_jobs.trial import make_trainable, train_worker

TUNE_FOLDER = "tune"


def build_tuner(space: SearchSpace, store: ResultsStore, *, resume: bool) -> tune.Tuner:
    trainable = make_trainable(train_worker, resources=space.resources, max_failures=space.search.max_failures,
                               keep_checkpoints=space.search.keep_checkpoints, metric=space.search.metric,
                               mode=space.search.mode)
    if resume:
        # The restored Tuner brings back its searcher, scheduler and callbacks (ResultsRecorder
        # re-reads epochs.parquet in setup()); unfinished trials restart from their checkpoints.
        return tune.Tuner.restore(store.uri(TUNE_FOLDER), trainable=trainable, resume_unfinished=True,
                                  resume_errored=False, restart_errored=False,
                                  storage_filesystem=store.fs if store.scheme else None)
    tables = ExperimentTables(metric=space.search.metric, mode=space.search.mode,
                              max_epochs=space.scheduler.max_epochs, gpus_per_trial=space.resources.per_trial().get("GPU", 0))
    return tune.Tuner(
        trainable,
        param_space=space.param_space(),
        tune_config=tune.TuneConfig(
            metric=space.search.metric,
            mode=space.search.mode,
            num_samples=space.search.num_samples,
            max_concurrent_trials=space.search.max_concurrent,
            search_alg=_searcher(space),
            scheduler=_scheduler(space),
        ),
        run_config=tune.RunConfig(
            name=TUNE_FOLDER,
            storage_path=store.uri(),
            storage_filesystem=store.fs if store.scheme else None,
            callbacks=[ResultsRecorder(store, tables)],
        ),
    )


def _searcher(space: SearchSpace):
    if space.search.searcher == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(seed=space.search.seed)
    # Tune applies max_concurrent_trials to Searchers only: a generator passed in must carry it.
    return BasicVariantGenerator(random_state=space.search.seed, max_concurrent=space.search.max_concurrent)


def _scheduler(space: SearchSpace):
    if space.scheduler.type == "none":
        return FIFOScheduler()
    # The reported epoch, not training_iteration: the latter restarts at 0 after a restore.
    return ASHAScheduler(time_attr="epoch", max_t=space.scheduler.max_epochs,
                         grace_period=space.scheduler.grace_period,
                         reduction_factor=space.scheduler.reduction_factor)
