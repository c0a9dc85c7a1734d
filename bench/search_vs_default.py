"""At equal compute, does the product's search give a better submission than the default trained as
long? The benchmark that decides what the product recommends (bench/README.md).

    python bench/search_vs_default.py --problem transfer --quickdraw PATH [--seeds 0 1 2]
    python bench/search_vs_default.py --problem scratch [--seeds 0 1 2]
    python bench/search_vs_default.py --problem scratch --quick      # a smoke run

Two problems:
- ``transfer``: real sketches (sketch_core.quickdraw): 60 Quick, Draw! classes x 40 training and
  40 test drawings at 64 px, and resnet18 pretrained on the other 285 classes by the product's own
  trainer (bench/searches.py: transfer_problem; built once under ``--work``);
- ``scratch``: generated demo data, 12 classes x 60 training images and 480 test images,
  test_resnet at 48 px from random weights.

Per seed, the arms, each the product's own commands, run alone and back to back, and scored on
test_answers.csv with the same test-time augmentation (the default, on):
- (a) the recommended path: ``tune.py`` over the problem's space (the seed as ``search.seed`` and
  ``fixed.seed``), then ``final_fit.py`` with each of ``--final`` (default ``--from-trials``).
  Its wall time, search plus the first final fit, is the compute budget;
- (b) the default configuration (TrainConfig's defaults on the problem's model, all training
  data): ``python -m sketch_core.train`` for as many epochs as fit in (a)'s wall time, as one
  run, and as ``--split-seeds`` runs of a share of them each whose probabilities are averaged; a
  user with the budget would take the better of the two. The epochs are sized from two short
  runs of the default timed on this machine just before (its start-up and its seconds per epoch).

Prints each arm's test accuracy, wall time, trial-epochs and GPU-hours per seed, then the medians
and ranges over seeds, and the last line is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from searches import (
    REPO_ROOT,
    add_problem_options,
    prepare_work,
    print_table,
    run_command,
    spread,
    spread_text,
    test_accuracy,
    test_answers,
    timed_search,
    transfer_problem,
)

FINALS = {
    "from-trials": ["--from-trials"],
    "best": ["--best"],
    "warm": ["--best", "--warm"],
    "folds": ["--best", "--folds", "3"],
}


def problem(name: str, args: argparse.Namespace) -> dict:
    """The data, the model options of both arms, and the search's space of problem ``name``."""
    if name == "transfer":
        data_dir, backbone, pretrained = transfer_problem(args.quickdraw, args.work)
        model = {
            "name": "resnet18",
            "pretrained": False,
            "image_size": 64,
            "checkpoint_file": str(backbone),
        }
        space = {
            "freeze": {"choice": ["head", "last_n_blocks", "none"]},
            "lr": [
                {"when": {"freeze": "head"}, "loguniform": [3.0e-3, 3.0e-2]},
                {"when": {"freeze": "last_n_blocks"}, "loguniform": [3.0e-4, 3.0e-3]},
                {"loguniform": [2.0e-4, 2.0e-3]},
            ],
            "label_smoothing": {"uniform": [0.0, 0.2]},
            "weight_decay": {"loguniform": [1.0e-3, 1.0e-1]},
        }
        return {
            "data_dir": data_dir,
            "model": model,
            "space": space,
            "max_epochs": 10,
            "trials": 8,
            "grace": 5,
            "pretrained": pretrained,
        }
    from sketch_core.demo_data import generate

    data_dir = args.work / "scratch-data"
    if not data_dir.exists():
        generate(
            data_dir,
            classes=12,
            images_per_class=60,
            test_images=480,
            min_size=96,
            max_size=160,
            seed=5,
        )
    space = {
        "lr": {"loguniform": [3.0e-4, 3.0e-2]},
        "weight_decay": {"loguniform": [1.0e-3, 1.0e-1]},
        "augment": {"choice": ["none", "light", "sketch"]},
        "label_smoothing": {"uniform": [0.0, 0.2]},
    }
    return {
        "data_dir": data_dir,
        "model": {"name": "test_resnet", "pretrained": False, "image_size": 48},
        "space": space,
        "max_epochs": 30,
        "trials": 8,
        "grace": 10,
    }


def default_options(setup: dict, *, seed: int) -> list:
    """``python -m sketch_core.train`` options of the default on all training data."""
    model = setup["model"]
    return [
        "--data-dir",
        setup["data_dir"],
        "--model",
        model["name"],
        "--image-size",
        model["image_size"],
        "--val-fraction",
        0,
        "--num-workers",
        0,
        "--seed",
        seed,
        *(["--checkpoint-file", model["checkpoint_file"]] if model.get("checkpoint_file") else []),
    ]


def search_arm(setup: dict, folder: Path, *, seed: int, finals: list[str]) -> dict:
    """(a): the search and each final fit as a user runs them."""
    from sketch_core.config import TrainConfig

    default = {
        name: getattr(TrainConfig(), name) for name in ("lr", "label_smoothing", "weight_decay")
    }
    start = {k: v for k, v in default.items() if k in setup["space"]}
    if "freeze" in setup["space"]:
        start["freeze"] = "none"  # TrainConfig's default: fine-tune everything
    results, search_s = timed_search(
        {
            "experiment": f"search-{seed}",
            "data": {"dir": str(setup["data_dir"])},
            "model": setup["model"],
            "resources": {"workers": 1, "cpus_per_worker": 0.9, "head_cpus": 0.9},
            "search": {
                "searcher": "optuna",
                "num_samples": setup["trials"] - 1,
                "start_from": [start],
                "max_concurrent": 2,
                "startup_trials": 3,
                "seed": seed,
            },
            "scheduler": {
                "type": "asha",
                "max_epochs": setup["max_epochs"],
                "grace_period": setup["grace"],
                "reduction_factor": 2,
            },
            "fixed": {"num_workers": 0, "val_fraction": 0.2, "seed": seed},
            "space": setup["space"],
        },
        folder,
    )
    import pandas as pd

    trials = pd.read_parquet(results / "trials.parquet")
    arm = {
        "search_s": round(search_s, 1),
        "trial_epochs": int(trials["epochs_run"].sum()),
        "gpu_hours": float(trials["gpu_hours"].sum()),
        "best_val_acc": json.loads((results / "best.json").read_text())["val_acc"],
    }
    for final in finals:
        before = set((results / "final").glob("fit-*/fit.json"))
        done = run_command(
            [
                REPO_ROOT / "ray_jobs" / "final_fit.py",
                *FINALS[final],
                "--results",
                results.parent,
                "--name",
                results.name,
            ]
        )
        fit = json.loads(
            (set((results / "final").glob("fit-*/fit.json")) - before).pop().read_text()
        )
        submission = results / "final" / Path(fit["submission"]).name
        arm[final] = {
            "test_acc": test_accuracy(submission, setup["data_dir"]),
            "final_s": round(done.wall_s, 1),
            "wall_s": round(search_s + done.wall_s, 1),
            **(
                {"estimate": fit["from_trials"]["estimate"]["ensemble"]["accuracy"]}
                if fit.get("from_trials")
                else {}
            ),
        }
    return arm


def train_default(setup: dict, out: Path, *, epochs: int, seed: int) -> tuple[np.ndarray, float]:
    """(b): one run of the default; its test probabilities and wall seconds."""
    done = run_command(
        [
            "-m",
            "sketch_core.train",
            *default_options(setup, seed=seed),
            "--epochs",
            epochs,
            "--out",
            out,
            "--predict",
        ]
    )
    return np.load(out / "probs.npy"), done.wall_s


def default_arm(setup: dict, folder: Path, *, seed: int, budget_s: float, split_seeds: int) -> dict:
    """(b): the default trained for ``budget_s`` seconds, as one run and as ``split_seeds`` runs."""
    truth = test_answers(setup["data_dir"])
    # Start-up and seconds per epoch of the default on this machine, now.
    one = train_default(setup, folder / f"calibrate-1-{seed}", epochs=1, seed=seed)[1]
    three = train_default(setup, folder / f"calibrate-3-{seed}", epochs=3, seed=seed)[1]
    per_epoch, start_up = (three - one) / 2, one - (three - one) / 2

    def epochs_in(seconds: float) -> int:
        return max(1, round((seconds - start_up) / per_epoch))

    long_epochs = epochs_in(budget_s)
    probs, long_s = train_default(setup, folder / f"long-{seed}", epochs=long_epochs, seed=seed)
    runs = [
        train_default(
            setup,
            folder / f"split-{seed}-{k}",
            epochs=epochs_in(budget_s / split_seeds),
            seed=100 * seed + k,
        )
        for k in range(split_seeds)
    ]
    averaged = np.mean([p for p, _ in runs], axis=0)
    return {
        "per_epoch_s": round(per_epoch, 2),
        "start_up_s": round(start_up, 1),
        "one_run": {
            "test_acc": float((probs.argmax(1) == truth).mean()),
            "epochs": long_epochs,
            "wall_s": round(long_s, 1),
        },
        "seeds": {
            "test_acc": float((averaged.argmax(1) == truth).mean()),
            "runs": split_seeds,
            "epochs": epochs_in(budget_s / split_seeds),
            "wall_s": round(sum(s for _, s in runs), 1),
        },
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--problem", choices=("transfer", "scratch"), required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--final",
        nargs="+",
        choices=sorted(FINALS),
        default=["from-trials"],
        help="final_fit.py paths after each search; the first sets the budget",
    )
    parser.add_argument(
        "--split-seeds", type=int, default=3, help="(b): the budget split over N runs"
    )
    add_problem_options(parser)
    parser.add_argument("--quick", action="store_true", help="one seed, fewer trials and epochs")
    args = parser.parse_args(argv)
    prepare_work(args)
    setup = problem(args.problem, args)
    if args.quick:
        args.seeds = args.seeds[:1]
        setup.update(trials=3, max_epochs=3, grace=1)
    started = time.perf_counter()
    runs = {}
    with tempfile.TemporaryDirectory(prefix="bench-search-vs-default-") as tmp:
        for seed in args.seeds:
            folder = Path(tmp) / f"seed-{seed}"
            folder.mkdir()
            searched = search_arm(setup, folder, seed=seed, finals=args.final)
            budget = searched[args.final[0]]["wall_s"]
            default = default_arm(
                setup, folder, seed=seed, budget_s=budget, split_seeds=args.split_seeds
            )
            runs[seed] = {"search": searched, "default": default}
            print(f"seed {seed}: {json.dumps(runs[seed])}", flush=True)

    def summary(values, fmt="{:.4f}"):
        return spread_text(spread(values), fmt)

    rows = []
    for final in args.final:
        rows.append(
            (
                f"(a) tune.py + final_fit.py {' '.join(FINALS[final])}",
                summary([r["search"][final]["test_acc"] for r in runs.values()]),
                summary([r["search"][final]["wall_s"] for r in runs.values()], "{:.0f}"),
            )
        )
    for kind, label in (("one_run", "one run"), ("seeds", f"{args.split_seeds} seeds averaged")):
        rows.append(
            (
                f"(b) the default, {label}, as long",
                summary([r["default"][kind]["test_acc"] for r in runs.values()]),
                summary([r["default"][kind]["wall_s"] for r in runs.values()], "{:.0f}"),
            )
        )
    gaps = [
        r["search"][args.final[0]]["test_acc"]
        - max(r["default"]["one_run"]["test_acc"], r["default"]["seeds"]["test_acc"])
        for r in runs.values()
    ]
    print(f"\n{args.problem}: seeds {args.seeds}; all {time.perf_counter() - started:.0f} s")
    print_table(("arm", "test acc, median (min..max)", "wall s"), rows)
    per_seed = ", ".join(f"{100 * gap:+.1f}" for gap in gaps)
    print(
        f"(a) {args.final[0]} minus the better (b) of the same seed: "
        f"{100 * statistics.median(gaps):+.1f} points median ({per_seed})"
    )
    print(
        json.dumps(
            {
                "problem": args.problem,
                "seeds": args.seeds,
                "finals": args.final,
                "runs": runs,
                "gap_median": round(statistics.median(gaps), 4),
                "gaps": [round(g, 4) for g in gaps],
                "setup": {k: str(v) if isinstance(v, Path) else v for k, v in setup.items()},
                "cpus": len(os.sched_getaffinity(0)),
                "wall_s": round(time.perf_counter() - started, 1),
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
