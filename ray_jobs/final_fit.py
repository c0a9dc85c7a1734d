"""Build the submission from a search: its own models ensembled, or its best configuration(s)
refitted on all training data (or K folds); predict test.csv, submit.

    python ray_jobs/final_fit.py --from-trials         # the search's models, greedy-ensembled
    python ray_jobs/final_fit.py --best                # refit the best trial of the latest search
    python ray_jobs/final_fit.py --best --warm         # ... starting from that trial's weights
    python ray_jobs/final_fit.py --best --name eva02_large_448 --top-k 3 --folds 5 --address auto
    python ray_jobs/final_fit.py --best --top-k 3 --folds 3 --ensemble greedy  # weights chosen
                                                                               # out of fold
    python ray_jobs/final_fit.py --trial bb8babe0      # a trial of your choice (its trial_id)

Writes results/<experiment>/final/: fit-<time>/ (each model's test probabilities and, when it
trained, its weights; the ensemble's probabilities; fit.json; the held-out predictions the
ensemble was chosen on) and a new submission file, never overwriting an earlier one.
"""

from __future__ import annotations

import argparse
import sys
import time

from ray_jobs.cli import run_cli
from sketch_core.config import TTA
from sketch_core.errors import SketchError

# --from-trials: the best trials whose models are candidates for the ensemble.
FROM_TRIALS_TOP_K = 10


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python ray_jobs/final_fit.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    chosen = parser.add_mutually_exclusive_group()
    chosen.add_argument(
        "--from-trials",
        action="store_true",
        help="no retraining: ensemble the search's own models (its best trials at their best "
        "epochs), members and weights chosen on their validation predictions",
    )
    chosen.add_argument("--best", action="store_true", help="refit the best trial(s) of the search")
    chosen.add_argument(
        "--trial", metavar="TRIAL_ID", help="refit this trial (a trial_id of trials.parquet)"
    )
    parser.add_argument(
        "--warm",
        action="store_true",
        help="with --best or --trial: start from the trial's weights at its best epoch and train "
        "--epochs more on all the training data, instead of training from scratch",
    )
    parser.add_argument("--name", help="experiment (default: the latest under --results)")
    parser.add_argument(
        "--results", default="results", help="results root: a path, NFS path or s3://, gs:// URI"
    )
    parser.add_argument("--data-dir", help="data folder (default: the one the search used)")
    parser.add_argument(
        "--top-k",
        type=int,
        help="refit: soft-vote the K best distinct configurations (default 1); --from-trials: the "
        f"K best trials are the candidates (default {FROM_TRIALS_TOP_K})",
    )
    parser.add_argument(
        "--folds", type=int, default=0, help="train K stratified folds of each and soft-vote them"
    )
    parser.add_argument(
        "--ensemble",
        choices=("mean", "greedy"),
        default="mean",
        help="combine the configurations by an equal soft vote (mean), or by weights chosen on "
        "their out-of-fold predictions (greedy, Caruana's ensemble selection; needs --folds)",
    )
    parser.add_argument(
        "--select-by",
        choices=("log_loss", "accuracy"),
        default="log_loss",
        help="what greedy selection optimises on the held-out predictions",
    )
    parser.add_argument(
        "--calibrate",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="with --folds or --from-trials: scale each member's probabilities by the "
        "temperature that fits its held-out predictions best, before combining them",
    )
    parser.add_argument(
        "--tta",
        action=argparse.BooleanOptionalAction,
        default=TTA,
        help="average the prediction of each image and its horizontal flip",
    )
    parser.add_argument(
        "--epochs",
        type=int,
        help="train this many epochs (default: as many as the search's budget left fit, "
        "timed by the trial's own epochs; without a budget, where the trial peaked, and with "
        "--warm the share of those its validation split held out, at least 1)",
    )
    parser.add_argument(
        "--max-concurrent", type=int, help="refits at once (default: as many as fit)"
    )
    parser.add_argument(
        "--address", help="Ray cluster to join ('auto' on a cluster node); default: local Ray"
    )
    parser.add_argument("--num-cpus", type=int, help="CPUs local Ray may use (default: all)")
    parser.add_argument(
        "--mlflow",
        nargs="?",
        const="",
        metavar="URI",
        help="log the refit to MLflow (default: where the search was logged, or "
        "MLFLOW_TRACKING_URI; --mlflow alone: a SQLite store beside the results)",
    )
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="also print Ray's own output: Tune's tables, the workers' lines",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_cli(lambda: final_fit(args), after_interrupt="run final_fit.py again for a new fit")


def final_fit(args: argparse.Namespace) -> None:
    import ray

    from ray_jobs import submission
    from ray_jobs.cluster import check_trial_fits, start_ray
    from ray_jobs.refit import fit_models, npy_bytes
    from ray_jobs.space import Resources
    from ray_jobs.tracking import log_refit, refit_tracking
    from sketch_core.ensemble import equal_vote
    from sketch_core.io import unused_path
    from sketch_core.models import check_pretrained_weights
    from sketch_core.predict import submission_frame

    began = time.monotonic()
    check_options(args)
    # Read and check everything before Ray starts.
    store, search, data_dir, train, test = read_experiment(args)
    specs = chosen_models(args, store, search, data_dir)
    weights = {
        (
            spec.config["model"],
            spec.config.get("pretrained", False),
            spec.config.get("checkpoint_file", ""),
        )
        for spec in specs
    }  # the models mostly share them: check each once
    for model, pretrained, checkpoint_file in sorted(weights):
        check_pretrained_weights(model, pretrained=pretrained, checkpoint_file=checkpoint_file)
    resources = Resources.from_dict(search["resources"])
    mlflow_uri = refit_tracking(args.mlflow, store, search)
    left = budget_left(search)
    if left:
        print(budget_left_line(left, search["budget"]), flush=True)
    folder = "final/fit-" + time.strftime("%Y%m%d-%H%M%S")
    started = time.time()

    dashboard = start_ray(args.address, num_cpus=args.num_cpus, verbose=args.verbose)
    try:
        if dashboard:
            print(f"Ray dashboard: {dashboard}", flush=True)
        check_trial_fits(resources, store.uri("search.json"))
        seconds_each = None
        if left and not args.from_trials and args.epochs is None:
            specs, seconds_each = fill_budget(
                specs,
                store=store,
                search=search,
                resources=resources,
                left=left,
                elapsed_s=time.monotonic() - began,
                max_concurrent=args.max_concurrent or len(specs),
            )
        print(
            f"{'predicting with' if args.from_trials else 'refitting'} {len(specs)} model(s) of "
            f"{store.experiment}: "
            + ", ".join(
                f"{s.model_id} (trial {s.source_trial}, {s.until_epoch} epochs)" for s in specs
            ),
            flush=True,
        )
        fitted, interrupted = fit_models(
            specs,
            store=store,
            folder=folder,
            resources=resources,
            tta=args.tta,
            max_failures=search["max_failures"],
            max_concurrent=args.max_concurrent or len(specs),
            verbose=args.verbose,
        )
    finally:
        ray.shutdown()
    check_refits(fitted, interrupted=interrupted, tune_folder=store.uri(folder, "tune"))

    test_probs = submission.test_predictions(store, folder, specs)
    held_out, summary = {}, {}
    if args.from_trials:
        rows, held_out = submission.validation_predictions(store, folder, specs)
        combined, summary["from_trials"] = submission.from_trials(
            held_out,
            train.targets[rows],
            calibrate=args.calibrate,
            select_by=args.select_by,
            seed=int(specs[0].config["seed"]),
        )
    elif args.folds:
        combined, summary["out_of_fold"], held_out = submission.from_folds(
            store,
            folder,
            specs,
            train.targets,
            method=args.ensemble,
            calibrate=args.calibrate,
            select_by=args.select_by,
            search_best=store.read_json("best.json")["val_acc"],
        )
    else:
        combined = equal_vote(list(test_probs["members"]))
    if held_out:
        held_out["ensemble"] = combined(held_out)
    for member, probs in held_out.items():
        store.write_bytes(
            f"{folder}/{'oof' if args.folds else 'val'}-{member}.npy", npy_bytes(probs)
        )
    ensemble = combined(test_probs["members"])
    store.write_bytes(f"{folder}/probs-ensemble.npy", npy_bytes(ensemble))
    submission_name = unused_path("final/submission.csv", exists=store.exists)
    store.write_bytes(
        submission_name, submission_frame(test.frame, ensemble).to_csv(index=False).encode()
    )
    scores = submission.scores_against_answers(
        data_dir, test.frame, {**test_probs["models"], "ensemble": ensemble}
    )
    log = {
        "experiment": store.experiment,
        "submission": store.uri(submission_name),
        "data_dir": data_dir,
        "how": "from_trials" if args.from_trials else "warm" if args.warm else "refit",
        "tta": args.tta,
        "top_k": args.top_k,
        "folds": args.folds,
        "wall_s": round(time.time() - started, 1),
        "budget_s_per_model": seconds_each,
        "models": [
            {
                "model_id": s.model_id,
                "source_trial": s.source_trial,
                "epochs": s.until_epoch,
                "seed": s.config["seed"],
                "config": s.config,
                "val_acc": _number(fitted.loc[fitted["model_id"] == s.model_id, "val_acc"].iloc[0]),
            }
            for s in specs
        ],
        "ensemble": {
            "method": "greedy" if args.from_trials else args.ensemble,
            "weights": combined.weights,
            "temperatures": combined.temperatures,
        },
        "out_of_fold": summary.get("out_of_fold"),
        "from_trials": summary.get("from_trials"),
        "test_accuracy": scores,
    }
    store.write_json(f"{folder}/fit.json", log)
    if summary.get("from_trials"):
        submission.print_from_trials(summary["from_trials"])
    if summary.get("out_of_fold"):
        submission.print_out_of_fold(summary["out_of_fold"])
    if scores:
        print(
            "accuracy against test_answers.csv: "
            + ", ".join(f"{k} {v:.4f}" for k, v in scores.items())
        )
    print(f"models and probabilities: {store.uri(folder)}")
    if summary.get("out_of_fold"):
        from ray_jobs.report import write_report

        print(f"report (with the out-of-fold table and reliability diagram): {write_report(store)}")
    if mlflow_uri:
        run_id = log_refit(
            mlflow_uri, store, search, fit=log, folder=folder, submission=submission_name
        )
        print(f"MLflow: run {run_id} in {mlflow_uri}")
    print(f"submission: {store.uri(submission_name)}")


def budget_left(search: dict) -> dict[str, float]:
    """What the search's budgets leave the final fit (search.json: ``budget``, ``spent``): hours
    and GPU-hours, each only where the search had that budget."""
    budget, spent = search.get("budget") or {}, search.get("spent") or {}
    return {
        key: budget[key] - spent.get(key, 0.0) for key in ("hours", "gpu_hours") if budget.get(key)
    }


def budget_left_line(left: dict[str, float], budget: dict) -> str:
    units = {"hours": "hours", "gpu_hours": "GPU-hours"}
    return "budget left for the final fit: " + " and ".join(
        f"{amount:.3g} of {budget[key]:g} {units[key]}" for key, amount in left.items()
    )


def fill_budget(
    specs: list,
    *,
    store,
    search: dict,
    resources,
    left: dict[str, float],
    elapsed_s: float,
    max_concurrent: int,
) -> tuple[list, float | None]:
    """The refits sized to spend what the budget left, each timed by its search trial's epochs
    (refit.budget_sized), with the line that says so; and the seconds each was given (None, and
    the refits as they were, where no budget limits them)."""
    from ray_jobs.cluster import trials_at_once
    from ray_jobs.refit import budget_sized, seconds_per_model

    needs = [resources.of_trial(spec.config) for spec in specs]
    at_once = min([max_concurrent, *(trials_at_once(need) for need in needs)])
    seconds = seconds_per_model(
        left,
        models=len(specs),
        at_once=at_once,
        gpus=sum(need.get("GPU", 0.0) for need in needs),
        elapsed_s=elapsed_s,
    )
    if seconds is None:  # a GPU-hour budget only, and refits that hold no GPU: nothing to size
        return specs, None
    sized, lines = budget_sized(
        specs,
        trials=store.read_parquet("trials.parquet"),
        epochs=store.read_parquet("epochs.parquet"),
        base=search["base"],
        seconds=seconds,
    )
    print(
        f"the budget gives each of {len(specs)} refit(s) {seconds:.0f} s ({at_once} at a time): "
        + "; ".join(lines)
        + ". --epochs N sets them instead",
        flush=True,
    )
    return sized, round(seconds, 1)


def check_options(args: argparse.Namespace) -> None:
    if not (args.best or args.trial or args.from_trials):
        raise SketchError(
            "say how to build the submission: --from-trials (the search's own models), --best "
            "(refit the best trial of the search) or --trial TRIAL_ID"
        )
    for option, value in (
        ("--top-k", args.top_k),
        ("--epochs", args.epochs),
        ("--max-concurrent", args.max_concurrent),
    ):
        if value is not None and value < 1:
            raise SketchError(f"{option}: expected at least 1, got {value}")
    if args.trial and (args.top_k or 1) > 1:
        raise SketchError(
            f"--top-k {args.top_k}: goes with --best; --trial refits one configuration"
        )
    if args.folds == 1 or args.folds < 0:
        raise SketchError(f"--folds: expected 0 (no folds) or at least 2, got {args.folds}")
    if args.ensemble == "greedy" and not args.folds:
        raise SketchError(
            "--ensemble greedy: needs --folds K (it chooses the weights on out-of-fold "
            "predictions); --from-trials chooses its own on the validation predictions"
        )
    if args.from_trials and (args.folds or args.warm or args.epochs):
        raise SketchError(
            "--from-trials: uses the search's models as they are; --folds, --warm and --epochs "
            "go with --best or --trial"
        )
    if args.warm and args.folds:
        raise SketchError("--warm: continues a trial's model on all the data; it has no folds")


def read_experiment(args: argparse.Namespace):
    """The experiment's store, its search.json, the data folder and its train and test tables, all
    checked."""
    from ray_jobs.cli import local_path
    from ray_jobs.results import BEST_KEYS, ResultsStore, latest_experiment, read_search
    from sketch_core.data import read_test_table, read_train_table

    store = ResultsStore(args.results, args.name or latest_experiment(args.results))
    search = read_search(store)
    if not store.exists("best.json"):
        raise SketchError(
            f"{store.uri()}: no finished trial yet (no best.json); "
            "let the search report a result first"
        )
    # The search's own record of its best: damaged means one line now.
    store.read_json("best.json", required=BEST_KEYS)
    data_dir = local_path(args.data_dir) if args.data_dir else search["data_dir"]
    train = read_train_table(data_dir)
    if train.class_names != search["class_names"]:
        raise SketchError(
            f"{data_dir}: its {train.num_classes} classes differ from the "
            f"{len(search['class_names'])} the experiment {store.experiment} was searched on"
        )
    return store, search, data_dir, train, read_test_table(data_dir)


def chosen_models(args: argparse.Namespace, store, search: dict, data_dir: str) -> list:
    """The models to fit (or, --from-trials, to predict with), from the search's tables."""
    from ray_jobs.refit import choose_models, trial_models
    from ray_jobs.results import best_checkpoints

    trials = store.read_parquet("trials.parquet")
    checkpoints = (
        best_checkpoints(trials, store.read_parquet("epochs.parquet"))
        if args.from_trials or args.warm
        else None
    )
    if args.from_trials:
        specs = trial_models(
            trials,
            metric=search["metric"],
            mode=search["mode"],
            base=search["base"],
            top_k=args.top_k or FROM_TRIALS_TOP_K,
            data_dir=data_dir,
            checkpoints=checkpoints,
        )
        check_one_split(specs, store)
        return specs
    return choose_models(
        trials,
        metric=search["metric"],
        mode=search["mode"],
        searched=search["searched"],
        base=search["base"],
        top_k=args.top_k or 1,
        folds=args.folds,
        epochs=args.epochs,
        data_dir=data_dir,
        trial_id=args.trial,
        checkpoints=checkpoints,
    )


def check_one_split(specs: list, store) -> None:
    """--from-trials compares the trials' validation predictions image by image: refuse trials
    that validated on other images than the best one."""
    from ray_jobs.refit import SPLIT_FIELDS

    if not specs:
        raise SketchError(
            f"{store.uri()}: --from-trials: no trial kept a checkpoint at its best epoch"
        )
    first = specs[0]
    for spec in specs[1:]:
        differ = [
            f"{f} {first.config[f]} and {spec.config[f]}"
            for f in SPLIT_FIELDS
            if spec.config[f] != first.config[f]
        ]
        if differ:
            raise SketchError(
                f"--from-trials: trials {first.source_trial} and {spec.source_trial} validated on "
                f"other images ({', '.join(differ)}); their predictions cannot be compared image "
                "by image. Search with one seed and split, or refit with --best"
            )


def check_refits(fitted, *, interrupted: bool, tune_folder: str) -> None:
    """Raise unless every refit predicted the test set: KeyboardInterrupt after a Ctrl-C (Ray Tune
    took it and stopped the refits), else one error line naming the refits and why."""
    if interrupted:
        raise KeyboardInterrupt
    failed = fitted[~fitted["done"]]
    if not len(failed):
        return
    errors = [error for error in failed["error"] if error]
    reason = f"failed: {errors[0]}" if errors else "ended without predicting the test set"
    raise SketchError(f"refit of {', '.join(failed['model_id'])} {reason}; see {tune_folder}")


def _number(value):
    return None if value is None or value != value else float(value)


if __name__ == "__main__":
    sys.exit(main())
