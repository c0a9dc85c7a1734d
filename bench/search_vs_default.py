"""At equal compute, does a search plus refit beat training the default configuration for longer?

    python bench/search_vs_default.py [--trials 8] [--epochs 30] [--graces 1 [3 ...]]
                                      [--startup-trials 3] [--variants [stretch] [warmup]]
    python bench/search_vs_default.py --quick  # 4 trials of 3 epochs, fewer images: a smoke run

On demo data (12 classes, 60 training images each, 480 test images with their answers in
test_answers.csv, so one test point is about 5 images), test_resnet at 48 px trained from scratch:

(a) the real commands: ``ray_jobs/tune.py`` (Optuna TPE + ASHA, reduction factor 3, over lr,
    weight_decay, augment and label_smoothing; every other setting TrainConfig's default; 2
    trials at a time; ``--trials`` in all, the first of them the default itself, as
    ``search.start_from``; TPE's first ``--startup-trials`` random), then ``ray_jobs/final_fit.py
    --best`` (the winner on all training data, for the epochs at which it peaked). A trial's
    schedule is ``--epochs`` long: the length the winner is refitted for, since a configuration
    chosen on short schedules did not carry over to a long one. Once per ASHA grace period in
    ``--graces`` (default 1);
(a') the first search's winner refitted for as long as (b) trains (``final_fit.py --best
    --epochs N``: a whole cosine schedule of that length), to tell the configuration the search
    found apart from the length of the schedule it is refitted with;
(b) ``python -m sketch_core.train`` with TrainConfig's defaults on all training data
    (``--val-fraction 0``, as the refit), for as many epochs as (a)'s first search plus refit
    trained, counted in passes over the training images: a search trial's epoch covers the 80%
    outside its validation split, a refit's or (b)'s epoch all of it. Then the default trained only
    for the search's ``--epochs`` (is it "longer" that matters?), and the ``--variants`` asked for,
    each one change: ``stretch`` (``resize: stretch``; the default letterboxes), ``warmup`` (1
    warm-up epoch). The default runs with ``--default-seeds`` seeds to show what one seed's noise
    is.

Both arms predict test.csv without test-time augmentation (``final_fit.py --no-tta``;
``sketch_core.train --predict`` has none), so only training differs. Prints each one's test
accuracy against test_answers.csv, the epochs it trained (raw trial-epochs and full-data epoch
equivalents) and its wall time; the last line is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from searches import (
    REPO_ROOT,
    print_table,
    run_command,
    spread,
    spread_text,
    test_accuracy,
    timed_search,
)

MODEL, IMAGE_SIZE, VAL_FRACTION = "test_resnet", 48, 0.2
SPACE = {
    "lr": {"loguniform": [3.0e-4, 3.0e-2]},
    "weight_decay": {"loguniform": [1.0e-3, 1.0e-1]},
    "augment": {"choice": ["none", "light", "sketch"]},
    "label_smoothing": {"uniform": [0.0, 0.2]},
}
# Each variant of (b): its name, and the options it adds to the default command.
VARIANTS = {
    "stretch": ("default, resize stretch", ["--resize", "stretch"]),
    "warmup": ("default, 1 warm-up epoch", ["--warmup-epochs", "1"]),
}


def refit(results: Path, data_dir: Path, *options) -> dict:
    """``final_fit.py --best`` of a search as a user runs it, with ``options``; its test accuracy,
    epochs and wall time."""
    before = set((results / "final").glob("fit-*/fit.json"))
    done = run_command(
        [
            REPO_ROOT / "ray_jobs" / "final_fit.py",
            "--best",
            "--no-tta",
            "--results",
            results.parent,
            "--name",
            results.name,
            *options,
        ]
    )
    fit = json.loads((set((results / "final").glob("fit-*/fit.json")) - before).pop().read_text())
    submission = results / "final" / Path(fit["submission"]).name
    return {
        "test_acc": test_accuracy(submission, data_dir),
        "epochs": int(fit["models"][0]["epochs"]),
        "wall_s": round(done.wall_s, 1),
    }


def search_then_refit(
    data_dir: Path, folder: Path, *, grace: int, trials: int, epochs: int, startup_trials: int
) -> tuple[dict, Path]:
    """(a): the search and the refit as a user runs them; test accuracy, epochs, wall time, and the
    search's results folder."""
    from sketch_core.config import TrainConfig

    default = {name: getattr(TrainConfig(), name) for name in SPACE}
    results, search_s = timed_search(
        {
            "experiment": f"search-grace{grace}",
            "data": {"dir": str(data_dir)},
            "model": {"name": MODEL, "pretrained": False, "image_size": IMAGE_SIZE},
            "resources": {"workers": 1, "cpus_per_worker": 0.9},
            "search": {
                "searcher": "optuna",
                "num_samples": trials - 1,
                "start_from": [default],
                "max_concurrent": 2,
                "startup_trials": startup_trials,
                "seed": 0,
            },
            "scheduler": {
                "type": "asha",
                "max_epochs": epochs,
                "grace_period": grace,
                "reduction_factor": 3,
            },
            "fixed": {
                "num_workers": 0,
                "val_fraction": VAL_FRACTION,
            },  # loader workers change speed, not results
            "space": SPACE,
        },
        folder,
    )
    import pandas as pd

    fitted = refit(results, data_dir)
    trial_epochs = len(pd.read_parquet(results / "epochs.parquet"))
    best = json.loads((results / "best.json").read_text())
    return {
        "test_acc": fitted["test_acc"],
        "trial_epochs": trial_epochs,
        "refit_epochs": fitted["epochs"],
        "full_data_epochs": round(trial_epochs * (1 - VAL_FRACTION) + fitted["epochs"], 1),
        "best_val_acc": best["val_acc"],
        "best_config": {k: best["config"][k] for k in SPACE},
        "search_s": round(search_s, 1),
        "wall_s": round(search_s + fitted["wall_s"], 1),
    }, results


def train_default(data_dir: Path, out: Path, *, epochs: int, seed: int, options: list[str]) -> dict:
    """(b): ``python -m sketch_core.train`` with the defaults and ``options``; test accuracy, wall
    time."""
    done = run_command(
        [
            "-m",
            "sketch_core.train",
            "--data-dir",
            data_dir,
            "--model",
            MODEL,
            "--image-size",
            IMAGE_SIZE,
            "--epochs",
            epochs,
            "--val-fraction",
            "0",
            "--num-workers",
            "0",
            "--seed",
            seed,
            *options,
            "--out",
            out,
            "--predict",
        ]
    )
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    return {
        "test_acc": test_accuracy(out / "submission.csv", data_dir),
        "epochs": epochs,
        "final_train_loss": round(last["train_loss"], 4),
        "wall_s": round(done.wall_s, 1),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument(
        "--epochs", type=int, default=30, help="epochs of a search trial that is not stopped"
    )
    parser.add_argument(
        "--startup-trials", type=int, default=3, help="search.startup_trials: TPE's random start"
    )
    parser.add_argument(
        "--variants",
        nargs="*",
        choices=sorted(VARIANTS),
        default=[],
        help="changes to the default to train as long as well",
    )
    parser.add_argument(
        "--graces",
        type=int,
        nargs="+",
        default=[1],
        help="ASHA grace periods, one search each (e.g. 1 3); (b) matches the first one's compute",
    )
    parser.add_argument(
        "--default-seeds", type=int, default=2, help="seeds of the plain default run"
    )
    parser.add_argument("--classes", type=int, default=12)
    parser.add_argument("--images-per-class", type=int, default=60)
    parser.add_argument("--test-images", type=int, default=480)
    parser.add_argument(
        "--quick", action="store_true", help="4 trials of 3 epochs, 8 x 20 images, one grace"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.trials, args.epochs, args.graces, args.default_seeds, args.startup_trials = (
            4,
            3,
            [1],
            1,
            2,
        )
        args.classes, args.images_per_class, args.test_images = 8, 20, 80
    from sketch_core.demo_data import generate

    variants = {"default": [], **dict(VARIANTS[name] for name in args.variants)}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-search-vs-default-") as tmp:
        tmp = Path(tmp)
        os.environ["SKETCH_CACHE_DIR"] = str(tmp / "cache")
        data_dir = generate(
            tmp / "data",
            classes=args.classes,
            images_per_class=args.images_per_class,
            test_images=args.test_images,
            min_size=96,
            max_size=160,
            seed=5,
        )
        searches, results = {}, {}
        for grace in args.graces:
            searches[grace], results[grace] = search_then_refit(
                data_dir,
                tmp,
                grace=grace,
                trials=args.trials,
                epochs=args.epochs,
                startup_trials=args.startup_trials,
            )
            print(f"search, ASHA grace {grace}: {searches[grace]}", flush=True)
        matched = max(1, round(searches[args.graces[0]]["full_data_epochs"]))
        # The winner's schedule as long as (b)'s: is it the configuration or the length that scores?
        long_refit = refit(results[args.graces[0]], data_dir, "--epochs", matched)
        print(
            f"search, ASHA grace {args.graces[0]}, winner refitted for {matched} epochs: "
            f"{long_refit}",
            flush=True,
        )
        runs = {
            (name, seed): dict(epochs=matched, seed=seed, options=options)
            for name, options in variants.items()
            for seed in range(args.default_seeds if name == "default" else 1)
        }
        runs[("default, search's max epochs", 0)] = dict(epochs=args.epochs, seed=0, options=[])
        defaults = {}
        for (name, seed), run in runs.items():
            defaults[(name, seed)] = train_default(data_dir, tmp / f"run-{len(defaults)}", **run)
            print(f"{name}, seed {seed}: {defaults[(name, seed)]}", flush=True)

    rows = [
        (
            f"(a) tune.py + final_fit.py, ASHA grace {grace}",
            f"{s['test_acc']:.4f}",
            f"{s['trial_epochs']} + {s['refit_epochs']} refit",
            f"{s['full_data_epochs']:.1f}",
            f"{s['wall_s']:.0f}",
        )
        for grace, s in searches.items()
    ]
    rows.append(
        (
            f"(a') its winner refitted for {matched} epochs (final_fit.py --epochs)",
            f"{long_refit['test_acc']:.4f}",
            f"{matched} refit",
            f"{matched:.1f}",
            f"{long_refit['wall_s']:.0f}",
        )
    )
    figures = {}
    for name in dict.fromkeys(name for name, _ in defaults):
        seeds = [run for (kind, _), run in defaults.items() if kind == name]
        figures[name] = {
            "test_acc": spread([run["test_acc"] for run in seeds]),
            "epochs": seeds[0]["epochs"],
            "seeds": len(seeds),
            "wall_s": round(sum(run["wall_s"] for run in seeds) / len(seeds), 1),
        }
        rows.append(
            (
                f"(b) sketch_core.train, {name}",
                spread_text(figures[name]["test_acc"], "{:.4f}")
                + (f", {len(seeds)} seeds" if len(seeds) > 1 else ""),
                f"{seeds[0]['epochs']}",
                f"{seeds[0]['epochs']:.1f}",
                f"{figures[name]['wall_s']:.0f}",
            )
        )
    print(
        f"\n{args.classes} classes x {args.images_per_class} training images, "
        f"{args.test_images} test images (1 point = {args.test_images / 100:.1f} images); "
        f"{MODEL} at {IMAGE_SIZE} px from scratch; search: "
        f"{args.trials} trials of up to {args.epochs} epochs (the first the default, TPE's first "
        f"{args.startup_trials} random); (b) matched to the first search's "
        f"{matched} full-data epochs; all {time.perf_counter() - started:.0f}s"
    )
    print_table(("run", "test acc", "epochs trained", "full-data epochs", "wall s"), rows)
    main_search, default = searches[args.graces[0]], figures["default"]["test_acc"]
    gap = main_search["test_acc"] - default["median"]
    print(
        f"at equal compute, search + refit minus the default trained as long: "
        f"{100 * gap:+.1f} points "
        f"(the default's seeds span {100 * (default['max'] - default['min']):.1f} points)"
    )
    print(
        f"the search's winner against the default, both trained {matched} epochs on all data: "
        f"{100 * (long_refit['test_acc'] - default['median']):+.1f} points"
    )
    print(
        json.dumps(
            {
                "search": {f"grace_{grace}": s for grace, s in searches.items()},
                "winner_refitted_for_matched_epochs": long_refit,
                "default": figures,
                "matched_full_data_epochs": matched,
                "search_minus_default": round(gap, 4),
                "trials": args.trials,
                "max_epochs": args.epochs,
                "startup_trials": args.startup_trials,
                "classes": args.classes,
                "train_images": args.classes * args.images_per_class,
                "test_images": args.test_images,
                "model": MODEL,
                "image_size": IMAGE_SIZE,
                "cpus": len(os.sched_getaffinity(0)),
                "wall_s": round(time.perf_counter() - started, 1),
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
