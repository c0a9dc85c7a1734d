"""Refit the best configuration(s) of a search on all training data, predict test.csv, submit.

    python ray_jobs/final_fit.py --best                # best trial of the latest experiment
    python ray_jobs/final_fit.py --best --name eva02_large_448 --top-k 3 --folds 5 --address auto
    python ray_jobs/final_fit.py --best --top-k 3 --folds 3 --ensemble greedy  # weights chosen
                                                                               # out of fold
    python ray_jobs/final_fit.py --trial bb8babe0      # a trial of your choice (its trial_id)

Writes results/<experiment>/final/: fit-<time>/ (each model's weights and test probabilities, the
ensemble's probabilities, fit.json; with --folds each configuration's out-of-fold probabilities
oof-<model>.npy, rows in train.csv order) and a new submission file, never overwriting an earlier
one.
"""

from __future__ import annotations

import argparse
import sys
import time

from ray_jobs.cli import run_cli
from sketch_core.config import TTA
from sketch_core.errors import SketchError


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python ray_jobs/final_fit.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    chosen = parser.add_mutually_exclusive_group()
    chosen.add_argument("--best", action="store_true", help="refit the best trial(s) of the search")
    chosen.add_argument(
        "--trial", metavar="TRIAL_ID", help="refit this trial (a trial_id of trials.parquet)"
    )
    parser.add_argument("--name", help="experiment (default: the latest under --results)")
    parser.add_argument(
        "--results", default="results", help="results root: a path, NFS path or s3://, gs:// URI"
    )
    parser.add_argument("--data-dir", help="data folder (default: the one the search used)")
    parser.add_argument(
        "--top-k", type=int, default=1, help="soft-vote the K best distinct configurations"
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
        help="what greedy selection optimises on the out-of-fold predictions",
    )
    parser.add_argument(
        "--calibrate",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="with --folds: scale each configuration's probabilities by the temperature that "
        "fits its out-of-fold predictions best, before combining them",
    )
    parser.add_argument(
        "--tta",
        action=argparse.BooleanOptionalAction,
        default=TTA,
        help="average the prediction of each image and its horizontal flip",
    )
    parser.add_argument(
        "--epochs", type=int, help="train this many epochs (default: where the trial peaked)"
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
    import numpy as np
    import ray

    from ray_jobs.cli import local_path
    from ray_jobs.cluster import check_trial_fits, start_ray
    from ray_jobs.refit import choose_models, fit_models, load_npy, npy_bytes, out_of_fold
    from ray_jobs.results import BEST_KEYS, ResultsStore, latest_experiment, read_search
    from ray_jobs.space import Resources
    from ray_jobs.tracking import log_refit, refit_tracking
    from sketch_core.data import read_test_table, read_train_table
    from sketch_core.ensemble import equal_vote, fit_ensemble
    from sketch_core.io import unused_path
    from sketch_core.models import check_pretrained_weights
    from sketch_core.predict import submission_frame

    if not args.best and not args.trial:
        raise SketchError(
            "say which configuration to refit: --best (the best trial of the search) "
            "or --trial TRIAL_ID"
        )
    for option, value in (
        ("--top-k", args.top_k),
        ("--epochs", args.epochs),
        ("--max-concurrent", args.max_concurrent),
    ):
        if value is not None and value < 1:
            raise SketchError(f"{option}: expected at least 1, got {value}")
    if args.trial and args.top_k > 1:
        raise SketchError(
            f"--top-k {args.top_k}: goes with --best; --trial refits one configuration"
        )
    if args.folds == 1 or args.folds < 0:
        raise SketchError(f"--folds: expected 0 (no folds) or at least 2, got {args.folds}")
    if args.ensemble == "greedy" and not args.folds:
        raise SketchError(
            "--ensemble greedy: needs --folds K (it chooses the weights on out-of-fold predictions)"
        )

    # Read and check everything before Ray starts.
    store = ResultsStore(args.results, args.name or latest_experiment(args.results))
    search = read_search(store)
    if not store.exists("best.json"):
        raise SketchError(
            f"{store.uri()}: no finished trial yet (no best.json); "
            "let the search report a result first"
        )
    store.read_json(
        "best.json", required=BEST_KEYS
    )  # the search's own record of its best: damaged means one line now
    data_dir = local_path(args.data_dir) if args.data_dir else search["data_dir"]
    train = read_train_table(data_dir)
    if train.class_names != search["class_names"]:
        raise SketchError(
            f"{data_dir}: its {train.num_classes} classes differ from the "
            f"{len(search['class_names'])} the experiment {store.experiment} was searched on"
        )
    test = read_test_table(data_dir)
    specs = choose_models(
        store.read_parquet("trials.parquet"),
        metric=search["metric"],
        mode=search["mode"],
        searched=search["searched"],
        base=search["base"],
        top_k=args.top_k,
        folds=args.folds,
        epochs=args.epochs,
        data_dir=data_dir,
        trial_id=args.trial,
    )
    weights = {
        (
            spec.config["model"],
            spec.config.get("pretrained", False),
            spec.config.get("checkpoint_file", ""),
        )
        for spec in specs
    }  # folds and top-k configurations mostly share them: check each once
    for model, pretrained, checkpoint_file in sorted(weights):
        check_pretrained_weights(model, pretrained=pretrained, checkpoint_file=checkpoint_file)
    resources = Resources.from_dict(search["resources"])
    mlflow_uri = refit_tracking(args.mlflow, store, search)
    folder = "final/fit-" + time.strftime("%Y%m%d-%H%M%S")
    started = time.time()

    dashboard = start_ray(args.address, num_cpus=args.num_cpus, verbose=args.verbose)
    try:
        if dashboard:
            print(f"Ray dashboard: {dashboard}", flush=True)
        check_trial_fits(resources, store.uri("search.json"))
        print(
            f"refitting {len(specs)} model(s) of {store.experiment}: "
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

    model_probs = {
        s.model_id: load_npy(store.read_bytes(f"{folder}/probs-{s.model_id}.npy")) for s in specs
    }
    members = list(dict.fromkeys(s.member for s in specs))
    test_probs = {
        member: np.mean([model_probs[s.model_id] for s in specs if s.member == member], axis=0)
        for member in members
    }  # a configuration's folds vote alike
    if args.folds:
        oof = out_of_fold(store, folder, specs, len(train.paths))
        combined = fit_ensemble(
            {m: probs for m, (probs, _) in oof.items()},
            train.targets,
            method=args.ensemble,
            calibrate=args.calibrate,
            metric=args.select_by,
        )
        estimate = out_of_fold_summary(
            oof,
            combined,
            train.targets,
            method=args.ensemble,
            select_by=args.select_by,
            search_best=store.read_json("best.json")["val_acc"],
        )
        for member, (probs, _) in oof.items():
            store.write_bytes(f"{folder}/oof-{member}.npy", npy_bytes(probs))
        store.write_bytes(
            f"{folder}/oof-ensemble.npy", npy_bytes(combined({m: p for m, (p, _) in oof.items()}))
        )
    else:
        combined, estimate = equal_vote(members), None
    ensemble = combined(test_probs)
    store.write_bytes(f"{folder}/probs-ensemble.npy", npy_bytes(ensemble))
    submission_name = unused_path("final/submission.csv", exists=store.exists)
    store.write_bytes(
        submission_name, submission_frame(test.frame, ensemble).to_csv(index=False).encode()
    )
    scores = _score_against_answers(data_dir, test.frame, {**model_probs, "ensemble": ensemble})
    log = {
        "experiment": store.experiment,
        "submission": store.uri(submission_name),
        "data_dir": data_dir,
        "tta": args.tta,
        "top_k": args.top_k,
        "folds": args.folds,
        "wall_s": round(time.time() - started, 1),
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
            "method": args.ensemble,
            "weights": combined.weights,
            "temperatures": combined.temperatures,
        },
        "out_of_fold": estimate,
        "test_accuracy": scores,
    }
    store.write_json(f"{folder}/fit.json", log)
    if estimate:
        print_out_of_fold(estimate)
    if scores:
        print(
            "accuracy against test_answers.csv: "
            + ", ".join(f"{k} {v:.4f}" for k, v in scores.items())
        )
    print(f"models and probabilities: {store.uri(folder)}")
    if estimate:
        from ray_jobs.report import write_report

        print(f"report (with the out-of-fold table and reliability diagram): {write_report(store)}")
    if mlflow_uri:
        run_id = log_refit(
            mlflow_uri, store, search, fit=log, folder=folder, submission=submission_name
        )
        print(f"MLflow: run {run_id} in {mlflow_uri}")
    print(f"submission: {store.uri(submission_name)}")


def out_of_fold_summary(
    oof: dict, combined, targets, *, method: str, select_by: str, search_best: float
) -> dict:
    """fit.json's ``out_of_fold``: each configuration's out-of-fold scores (per fold, pooled,
    before and after its temperature), the ensemble's, and the cross-validated estimate of the
    submitted ensemble's accuracy with its standard error over folds."""
    import numpy as np

    from sketch_core.ensemble import calibrated, fold_estimate, scores

    members = {}
    for member, (probs, fold_of_row) in oof.items():
        fixed = calibrated(probs, combined.temperatures[member])
        members[member] = {
            **scores(probs, targets),
            "log_loss_calibrated": scores(fixed, targets)["log_loss"],
            "temperature": combined.temperatures[member],
            "weight": combined.weights[member],
            "fold_accuracy": [
                scores(probs[fold_of_row == k], targets[fold_of_row == k])["accuracy"]
                for k in np.unique(fold_of_row)
            ],
        }
    fold_of_row = next(iter(oof.values()))[1]
    ensemble = combined({member: probs for member, (probs, _) in oof.items()})
    accuracy, error = fold_estimate(ensemble, targets, fold_of_row)
    return {
        "images": len(targets),
        "folds": int(fold_of_row.max()) + 1,
        "members": members,
        "ensemble": {
            "method": method,
            **({"select_by": select_by} if method == "greedy" else {}),
            **scores(ensemble, targets),
        },
        "estimate": {
            "accuracy": accuracy,
            "standard_error": error,
            "search_best_val_acc": search_best,
        },
    }


def print_out_of_fold(summary: dict) -> None:
    print(
        f"out-of-fold predictions of {summary['images']} training images, {summary['folds']} folds:"
    )
    for member, row in summary["members"].items():
        print(
            f"  {member:9s} accuracy {row['accuracy']:.4f}  log-loss {row['log_loss']:.4f} -> "
            f"{row['log_loss_calibrated']:.4f} at temperature {row['temperature']:.3g}  "
            f"weight {row['weight']:.3g}"
        )
    ensemble = summary["ensemble"]
    how = ensemble["method"] + (f" by {ensemble['select_by']}" if "select_by" in ensemble else "")
    print(
        f"  {'ensemble':9s} accuracy {ensemble['accuracy']:.4f}  "
        f"log-loss {ensemble['log_loss']:.4f} ({how})"
    )
    estimate = summary["estimate"]
    print(
        f"cross-validated accuracy of the submitted ensemble: {estimate['accuracy']:.4f} "
        f"± {estimate['standard_error']:.4f} (standard error over {summary['folds']} folds). "
        "Expect this on new data, not the search's best val_acc "
        f"({estimate['search_best_val_acc']:.4f}: the best of many trials on one split)"
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


def _score_against_answers(data_dir: str, test_frame, probs_by_model: dict) -> dict[str, float]:
    """Accuracy of each model and the ensemble where the answers are known (the demo data set)."""
    from sketch_core.demo_data import known_answers

    truth = known_answers(data_dir, test_frame["image_path"])
    if truth is None:
        return {}
    return {
        name: float((probs.argmax(1) == truth).mean()) for name, probs in probs_by_model.items()
    }


def _number(value):
    return None if value is None or value != value else float(value)


if __name__ == "__main__":
    sys.exit(main())
