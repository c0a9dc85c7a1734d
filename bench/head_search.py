"""A head-only search through Ray Tune against the same search in a plain loop in one process.

    python bench/head_search.py          # resnet18 at 64 px, backbone pre-trained briefly,
                                         # 48 configurations
    python bench/head_search.py --quick  # random-init backbone (accuracies near chance):
                                         # a smoke run

The same N head configurations of one frozen backbone, on the same cached features, with the same
seed and epochs, are trained (a) by ``ray_jobs/tune.py`` (grid searcher, no early stopping, head
trials in reused Tune processes), and (b) by an Optuna study in one process without Ray
(``GridSampler`` over the same grid, one ``TrainingRun`` per trial). The feature cache is built
once before both. Each is timed as the whole command a user runs: (a) with Ray's start-up, the
trial processes' imports and the report, (b) with its own imports.

Prints both wall times, the per-trial overhead ((a) - (b)) / N, the median time of one trial in
each, and each one's best val_acc (they agree within noise: the same runs, on 1 thread per trial
in (a), all threads in (b)); the last line is one JSON object. Targets on 2 cores: per-trial
overhead <= 1 s, (a)/(b) <= 3x.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from sketch_core.config import TrainConfig
from sketch_core.demo_data import generate
from sketch_core.engine import TrainingRun

# 2 x 3 x 2 x 2 x 2 = 48 configurations
GRID = {
    "head": ["linear", "mlp"],
    "lr": [3e-3, 1e-2, 3e-2],
    "label_smoothing": [0.0, 0.1],
    "head_dropout": [0.0, 0.3],
    "ema": [False, True],
}
TARGET_OVERHEAD_S, TARGET_RATIO = 1.0, 3.0


def plain_optuna_loop(base: dict) -> None:
    """(b), run as its own command: an Optuna grid study training in this process; prints its best
    val_acc and the seconds of each trial as JSON."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    trial_s = []

    def objective(trial: optuna.Trial) -> float:
        started = time.perf_counter()
        params = {name: trial.suggest_categorical(name, values) for name, values in GRID.items()}
        run = TrainingRun(TrainConfig.from_dict({**base, **params}))
        best = max(metrics["val_acc"] for metrics in run.epochs())
        trial_s.append(time.perf_counter() - started)
        return best

    study = optuna.create_study(
        direction="maximize", sampler=optuna.samplers.GridSampler(GRID, seed=0)
    )
    study.optimize(objective, n_trials=len(grid_configs()))
    print(json.dumps({"best_val_acc": study.best_value, "trial_s": trial_s}))


def timed_plain_loop(base: dict) -> tuple[float, float, float]:
    """(b): wall seconds of the plain loop's command, its best val_acc, its median trial seconds."""
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, __file__, "--plain-loop", json.dumps(base)],
        check=True,
        capture_output=True,
        text=True,
    )
    wall_s = time.perf_counter() - started
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return wall_s, result["best_val_acc"], statistics.median(result["trial_s"])


def tune_search(
    base: dict, folder: Path, *, concurrent: int, head_cpus: float
) -> tuple[float, float, float, int]:
    """(a): wall seconds of ``tune.py`` over the grid, its best val_acc, the median seconds of one
    trial (Tune's own time in the trial process) and how many trial processes trained them."""
    import pandas as pd
    from searches import run_search

    fixed = {
        key: value
        for key, value in base.items()
        if key not in ("data_dir", "model", "image_size", "checkpoint_file", "pretrained", "epochs")
    }
    space = {
        "experiment": "head-search",
        "data": {"dir": base["data_dir"]},
        "model": {
            "name": base["model"],
            "pretrained": False,
            "image_size": base["image_size"],
            "checkpoint_file": base["checkpoint_file"],
        },
        "resources": {"workers": 1, "cpus_per_worker": 1.0, "head_cpus": head_cpus},
        "search": {"searcher": "grid", "num_samples": 1, "max_concurrent": concurrent, "seed": 0},
        "scheduler": {"type": "none", "max_epochs": base["epochs"]},
        "fixed": fixed,
        "space": {name: {"grid": values} for name, values in GRID.items()},
    }
    started = time.perf_counter()
    results = run_search(space, folder)
    wall_s = time.perf_counter() - started
    trials = pd.read_parquet(results / "trials.parquet")
    epochs = pd.read_parquet(results / "epochs.parquet")
    assert len(trials) == len(grid_configs()) and (trials["status"] == "finished").all(), trials[
        ["status", "error"]
    ]
    assert (epochs["feature_cache"] == 1.0).all()
    return (
        wall_s,
        float(trials["best_val_acc"].max()),
        float(trials["wall_s"].median()),
        epochs["pids"].nunique(),
    )


def grid_configs() -> list[dict]:
    configs = [{}]
    for name, values in GRID.items():
        configs = [{**config, name: value} for config in configs for value in values]
    return configs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="random-init test_resnet, fewer images"
    )
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--images-per-class", type=int, default=60)
    parser.add_argument("--concurrent", type=int, default=2, help="head trials at once in (a)")
    parser.add_argument("--head-cpus", type=float, default=1.0)
    parser.add_argument(
        "--plain-loop", metavar="BASE_CONFIG_JSON", help=argparse.SUPPRESS
    )  # (b)'s own process
    args = parser.parse_args(argv)
    if args.plain_loop:
        plain_optuna_loop(json.loads(args.plain_loop))
        return 0
    if args.quick:
        args.model, args.image_size, args.images_per_class = "test_resnet", 48, 30
    from feature_cache import pretrain_backbone

    with tempfile.TemporaryDirectory(prefix="bench-head-search-") as tmp:
        tmp = Path(tmp)
        os.environ["SKETCH_CACHE_DIR"] = str(
            tmp / "cache"
        )  # shared by this process and tune.py's trials
        data = dict(
            classes=8,
            test_images=1,
            min_size=160,
            max_size=400,
            images_per_class=args.images_per_class,
        )
        data_dir = generate(tmp / "data", seed=3, **data)
        common = dict(
            model=args.model,
            image_size=args.image_size,
            batch_size=32,
            weight_decay=0.01,
            num_workers=0,
            seed=0,
        )
        checkpoint = ""
        if not args.quick:  # features a head can use, as pretrained weights would give
            pretrain = TrainConfig.from_dict(
                {
                    **common,
                    "data_dir": str(generate(tmp / "pretrain", seed=11, **data)),
                    "freeze": "none",
                    "augment": "light",
                    "lr": 5e-3,
                    "epochs": 10,
                }
            )
            checkpoint = str(pretrain_backbone(pretrain, tmp / "backbone.pth")[0])
        base = {
            **common,
            "data_dir": str(data_dir),
            "checkpoint_file": checkpoint,
            "freeze": "head",
            "augment": "none",
            "epochs": args.epochs,
        }

        started = time.perf_counter()
        list(
            TrainingRun(TrainConfig.from_dict({**base, **grid_configs()[0]})).epochs()
        )  # builds the caches
        cache_s = time.perf_counter() - started
        n = len(grid_configs())
        tune_s, tune_best, tune_trial_s, processes = tune_search(
            base, tmp, concurrent=args.concurrent, head_cpus=args.head_cpus
        )
        loop_s, loop_best, loop_trial_s = timed_plain_loop(base)

    overhead_s, ratio = (tune_s - loop_s) / n, tune_s / loop_s
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU only, no GPU"
    print(
        f"{n} head-only configurations of {args.model} at {args.image_size} px (frozen, "
        f"{'random init' if args.quick else 'pre-trained briefly'}), "
        f"{8 * args.images_per_class} images, {args.epochs} epochs each; "
        f"{len(os.sched_getaffinity(0))} CPUs, {device}; feature cache built once in "
        f"{cache_s:.1f}s"
    )
    print(
        f"(a) tune.py, {args.concurrent} trials at once, {processes} trial process(es): "
        f"{tune_s:7.1f}s  "
        f"one trial {tune_trial_s:.2f}s  best val_acc {tune_best:.4f}"
    )
    print(
        f"(b) Optuna loop in one process, no Ray:            {loop_s:7.1f}s  "
        f"one trial {loop_trial_s:.2f}s  best val_acc {loop_best:.4f}"
    )
    print(
        f"per-trial overhead {overhead_s:.2f}s (target <= {TARGET_OVERHEAD_S}s); "
        f"(a)/(b) {ratio:.2f}x "
        f"(target <= {TARGET_RATIO}x)"
    )
    print(
        json.dumps(
            {
                "trials": n,
                "tune_s": round(tune_s, 2),
                "loop_s": round(loop_s, 2),
                "overhead_per_trial_s": round(overhead_s, 3),
                "ratio": round(ratio, 3),
                "tune_trial_s": round(tune_trial_s, 3),
                "loop_trial_s": round(loop_trial_s, 3),
                "tune_best_val_acc": tune_best,
                "loop_best_val_acc": loop_best,
                "trial_processes": processes,
                "concurrent": args.concurrent,
                "model": args.model,
                "image_size": args.image_size,
                "epochs": args.epochs,
                "images": 8 * args.images_per_class,
                "cpus": len(os.sched_getaffinity(0)),
                "device": "cuda" if torch.cuda.is_available() else "cpu",
                "target_overhead_s": TARGET_OVERHEAD_S,
                "target_ratio": TARGET_RATIO,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
