"""Search hyperparameters: Ray Tune (ASHA + Optuna TPE) over Ray Train TorchTrainer trials.

    python ray_jobs/tune.py --space search_spaces/demo.yaml           # local Ray, demo data, CPU
    python ray_jobs/tune.py --space search_spaces/eva02.yaml --address auto \\
        --results s3://BUCKET/sketch-hpo
    python ray_jobs/tune.py --space search_spaces/demo.yaml --resume  # continue an interrupted
                                                                      # search

Writes results/<experiment>/: tune/ (Ray Tune's folder), trials.parquet, epochs.parquet,
best.json, search.json, report/. Command-line values override the space file.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

from ray_jobs.cli import run_cli
from sketch_core.errors import SketchError


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python ray_jobs/tune.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--space", required=True, help="search-space YAML (see search_spaces/)")
    parser.add_argument("--data-dir", help="competition data folder (overrides data.dir)")
    parser.add_argument(
        "--results", default="results", help="results root: a path, NFS path or s3://, gs:// URI"
    )
    parser.add_argument("--name", help="experiment name (overrides experiment)")
    parser.add_argument(
        "--num-samples", type=int, help="number of trials (overrides search.num_samples)"
    )
    parser.add_argument(
        "--max-concurrent", type=int, help="trials at once (overrides search.max_concurrent)"
    )
    parser.add_argument(
        "--address", help="Ray cluster to join ('auto' on a cluster node); default: start local Ray"
    )
    parser.add_argument("--num-cpus", type=int, help="CPUs local Ray may use (default: all)")
    parser.add_argument(
        "--resume", action="store_true", help="continue the experiment after an interruption"
    )
    parser.add_argument(
        "--warm-start",
        action="append",
        default=[],
        metavar="EXPERIMENT",
        help="give the searcher the trials of an earlier experiment (a name under --results, "
        "or its folder) that fit this space; repeatable",
    )
    parser.add_argument(
        "--mlflow",
        nargs="?",
        const="",
        metavar="URI",
        help="log the search to MLflow: a parent run, a child run per trial (default: "
        "MLFLOW_TRACKING_URI if set; --mlflow alone: a SQLite store beside the results)",
    )
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="also print Ray's own output: Tune's tables and configuration boxes, "
        "the workers' lines",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_cli(lambda: search(args), after_interrupt="continue with --resume")


def search(args: argparse.Namespace) -> None:
    from ray_jobs.cli import ensure_data_dir, local_path
    from ray_jobs.cluster import check_trial_fits, start_ray
    from ray_jobs.report import write_report
    from ray_jobs.results import ResultsStore, read_search
    from ray_jobs.space import load_space
    from ray_jobs.study import Study
    from ray_jobs.tracking import search_runs
    from ray_jobs.tuning import (
        TUNE_FOLDER,
        budget_split,
        build_tuner,
        check_saved_state,
        fit_noting_ctrl_c,
        warm_start_trials,
    )
    from sketch_core.data import read_train_table, verify_images
    from sketch_core.models import check_pretrained_weights

    # Everything that can be checked is checked before Ray starts.
    space = load_space(args.space).with_overrides(
        experiment=args.name,
        data_dir=args.data_dir,
        num_samples=args.num_samples,
        max_concurrent=args.max_concurrent,
    )
    data_dir = ensure_data_dir(space.data.dir, demo=space.data.demo)
    table = read_train_table(data_dir)
    verify_images(table.paths)
    # Nothing relative reaches a Ray worker: each runs in a working directory of its own.
    space = space.with_overrides(
        data_dir=data_dir, checkpoint_file=local_path(space.base["checkpoint_file"])
    )
    for model in space.models():
        check_pretrained_weights(
            model,
            pretrained=space.base.get("pretrained", False),
            checkpoint_file=space.base.get("checkpoint_file", ""),
        )
    store = ResultsStore(args.results, space.experiment)
    started_before = store.exists(f"{TUNE_FOLDER}/tuner.pkl")
    if args.resume and not started_before:
        raise SketchError(f"{store.uri()}: no search to resume; run without --resume first")
    if started_before and not args.resume:
        raise SketchError(
            f"{store.uri()}: experiment already exists; pass --resume to continue it, "
            "or --name for a new one"
        )
    # What the restored search reads back: a damaged file is one line here, not a traceback in Tune.
    if args.resume:
        for name in ("epochs.parquet", "trials.parquet"):
            if store.exists(name):
                store.read_parquet(name)
        check_saved_state(store)
    if args.warm_start and (args.resume or space.search.searcher != "optuna"):
        raise SketchError(
            "--warm-start: "
            + (
                "a resumed search keeps the warm start it began with"
                if args.resume
                else f"search.searcher {space.search.searcher} does not learn from earlier "
                "trials; use optuna"
            )
        )
    warm_start = warm_start_trials(
        space, [experiment_store(name, args.results) for name in args.warm_start]
    )
    study = Study(store)
    summary = read_search(store) if args.resume else search_summary(space, table.class_names)
    tracking = search_runs(args.mlflow, store, summary, resume=args.resume)

    import ray

    if not args.verbose:
        import optuna

        optuna.logging.set_verbosity(
            optuna.logging.WARNING
        )  # not a line per trial the searcher asks for
    dashboard = start_ray(args.address, num_cpus=args.num_cpus, verbose=args.verbose)
    try:
        if dashboard:
            print(f"Ray dashboard: {dashboard}", flush=True)
        if space.search.searcher == "optuna":
            print(f"Study view: {study.view_command()}", flush=True)
        if budget_split(space.search):
            print(budget_split(space.search), flush=True)
        check_trial_fits(space.resources, space.source)
        if args.resume:
            study.prepare_resume()
        else:
            study.start_new()
            if tracking:
                summary["mlflow"] = tracking.start_search(summary, store.uri())
            store.write_json("search.json", summary)
        if tracking:
            print(f"MLflow: run {tracking.run_id} in {tracking.uri}", flush=True)
        tuner = build_tuner(
            space,
            store,
            resume=args.resume,
            verbose=args.verbose,
            warm_start=warm_start,
            tracking=tracking,
        )
        started = time.monotonic()
        try:
            _, interrupted = fit_noting_ctrl_c(tuner)
        finally:
            record_spent(store, space, hours=(time.monotonic() - started) / 3600)
            study.upload()
    finally:
        ray.shutdown()
    print(f"report: {write_report(store)}", flush=True)
    if tracking:
        tracking.finish(store, interrupted=interrupted)
    print_summary(store, interrupted=interrupted)


def search_summary(space, class_names: list[str]) -> dict:
    """search.json: what final_fit and report need to know of the search beyond the tables."""
    from ray_jobs.results import SCHEMA_VERSION

    return {
        "schema": SCHEMA_VERSION,
        "experiment": space.experiment,
        "space_file": space.source,
        "data_dir": space.base["data_dir"],
        "class_names": class_names,
        "metric": space.search.metric,
        "mode": space.search.mode,
        "max_epochs": space.scheduler.max_epochs,
        "searched": space.params.names,
        "num_samples": space.search.num_samples,
        "params": {param.name: param.describe() for param in space.params},
        "base": space.base,
        "start_from": list(space.start_from),
        "budget": {
            "gpu_hours": space.search.budget_gpu_hours,
            "hours": space.search.budget_hours,
            "final_fit_share": space.search.final_fit_share,
        },
        "resources": dataclasses.asdict(space.resources),
        "max_failures": space.search.max_failures,
    }


def record_spent(store, space, *, hours: float) -> None:
    """Add this run's hours to search.json's ``spent`` (the budget counts every run of the search),
    with the GPU-hours of all trials so far and the budget that ended the search, if one did."""
    from ray_jobs.tuning import ended_by

    search = store.read_json("search.json")
    trials = store.read_parquet("trials.parquet") if store.exists("trials.parquet") else None
    spent = {
        "hours": search.get("spent", {}).get("hours", 0.0) + hours,
        "gpu_hours": float(trials["gpu_hours"].sum())
        if trials is not None and len(trials)
        else 0.0,
    }
    store.write_json(
        "search.json", {**search, "spent": spent, "ended_by": ended_by(space.search, spent)}
    )


def experiment_store(name: str, results: str):
    """``--warm-start`` and the like: an experiment name under ``results``, or an experiment
    folder."""
    from ray_jobs.results import ResultsStore

    if "/" in name or "://" in name:
        root, _, experiment = name.rstrip("/").rpartition("/")
        return ResultsStore(root, experiment)
    return ResultsStore(results, name)


def print_summary(store, *, interrupted: bool) -> None:
    import pandas as pd

    from ray_jobs.results import BEST_KEYS

    trials = store.read_parquet("trials.parquet") if store.exists("trials.parquet") else None
    if trials is not None and len(trials):
        counts = ", ".join(f"{n} {status}" for status, n in trials["status"].value_counts().items())
        print(f"\n{len(trials)} trials: {counts}")
    if interrupted:
        raise KeyboardInterrupt  # Ray Tune took the Ctrl-C and saved the search: say so, exit 130
    if trials is None or not len(trials):
        raise SketchError(f"{store.uri()}: the search reported no results")
    if not store.exists("best.json"):
        raise SketchError(
            f"{store.uri()}: no trial reported a metric; see the error column of trials.parquet"
        )
    best, search = store.read_json("best.json", required=BEST_KEYS), store.read_json("search.json")
    if search.get("ended_by"):
        spent, budget = search["spent"], search["budget"]
        print(
            f"the search ended on its budget ({search['ended_by']}): spent {spent['hours']:.3f} of "
            f"{budget['hours'] or '-'} hours, "
            f"{spent['gpu_hours']:.3f} of {budget['gpu_hours'] or '-'} GPU-hours; the rest is "
            "the final fit's"
        )
    print(
        f"best trial {best['trial_id']}: {best['metric']} {best[best['metric']]:.4f} "
        f"at epoch {best['epoch']}"
    )
    best_row = trials[trials["trial_id"] == best["trial_id"]].iloc[0]
    print(
        "  "
        + ", ".join(
            f"{k}={best['config'][k]}"
            for k in search["searched"]  # those it drew
            if not pd.isna(best_row.get(f"config.{k}"))
        )
    )
    for name in ("trials.parquet", "epochs.parquet", "best.json", "tune"):
        print(f"  {name:15s} {store.uri(name)}")


if __name__ == "__main__":
    sys.exit(main())
