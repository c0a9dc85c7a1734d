"""ASHA + Optuna TPE against random search without early stopping, over several seeds; then
conditional TPE against the flat space.

    python bench/search_efficiency.py [--seeds 5] [--trials 24] [--epochs 10]
    python bench/search_efficiency.py --quick          # 2 seeds, small problem: a smoke run

The problem: head-only trials (``freeze: head``) of resnet18 at 64 px, frozen after brief training
on separate demo images, on the cached features of 16 x 80 demo images with val_fraction 0.4 (512
validation images, so 1 point is 5 images, not one). A head-only trial costs well under a second
on 2 cores, so 5 seeds of every search fit in minutes; fine-tuning trials would each pay Ray
Train's ~30 s start-up, and the problem would have to stay tiny (the single-seed figure this
replaces had 64 validation images). Every search is the real ``ray_jobs/tune.py`` command, 2
trials at a time.

Searches, each run once per seed s (``search.seed`` = s and the training ``seed`` = s, which also
draws the train/validation split; searches of one seed share it):
- random search, no early stopping (the baseline);
- ASHA (grace 1 epoch, reduction factor 3) + TPE over the flat space: head, head_hidden,
  head_dropout, lr, label_smoothing, weight_decay;
- ASHA + TPE over the conditional space: head_hidden and head_dropout only for an MLP head, and
  lr's range by head (a linear head on these features does best at lr 1e-2-3e-2, an MLP head at
  1e-3-3e-3 and collapses at 1e-1). It needs conditional parameters in the space loader; where
  the loader refuses them the row says so and the other rows still run.

Per search, the median and range (min..max) over seeds of: trial-epochs, best val_acc, and the epoch
fraction (the trial-epochs, in the order they were reported, until the search's best came within
1 point of random search's best of the same seed, as a fraction of random search's trial-epochs),
with how many seeds came within 1 point at all. A claim is printed only where it holds in every
seed, else "no consistent claim". The last line is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from searches import head_problem, print_table, spread, spread_text, timed_search

WITHIN = 0.01  # "within 1 point" of random search's best val_acc
VAL_FRACTION = (
    0.4  # 512 of 16 x 80 images: enough that 1 point is 5 images, few enough that trials stay cheap
)
COMMON_SPACE = {
    "label_smoothing": {"uniform": [0.0, 0.2]},
    "weight_decay": {"loguniform": [1.0e-4, 1.0e-1]},
}
FLAT_SPACE = {
    "head": {"choice": ["linear", "mlp"]},
    "head_hidden": {"choice": [128, 512]},
    "head_dropout": {"uniform": [0.0, 0.5]},
    "lr": {"loguniform": [3.0e-4, 1.0e-1]},
    **COMMON_SPACE,
}
CONDITIONAL_SPACE = {
    "head": {"choice": ["linear", "mlp"]},
    "head_hidden": [{"when": {"head": "mlp"}, "choice": [128, 512]}],
    "head_dropout": [{"when": {"head": "mlp"}, "uniform": [0.0, 0.5]}],
    "lr": [
        {"when": {"head": "linear"}, "loguniform": [3.0e-3, 1.0e-1]},
        {"loguniform": [3.0e-4, 1.0e-2]},
    ],
    **COMMON_SPACE,
}
RANDOM, FLAT, CONDITIONAL = (
    "random, no stopping",
    "ASHA + TPE, flat space",
    "ASHA + TPE, conditional space",
)


def search_spec(name: str, *, base: dict, seed: int, trials: int, epochs: int, grace: int) -> dict:
    """The space file of one search of the benchmark."""
    asha = {"type": "asha", "max_epochs": epochs, "grace_period": grace, "reduction_factor": 3}
    searcher, scheduler, space = {
        RANDOM: ("random", {"type": "none", "max_epochs": epochs}, FLAT_SPACE),
        FLAT: ("optuna", asha, FLAT_SPACE),
        CONDITIONAL: ("optuna", asha, CONDITIONAL_SPACE),
    }[name]
    return {
        "experiment": (
            f"{searcher}-{'conditional' if space is CONDITIONAL_SPACE else 'flat'}-seed{seed}"
        ),
        "data": {"dir": base["data_dir"]},
        "model": {
            "name": base["model"],
            "pretrained": False,
            "image_size": base["image_size"],
            "checkpoint_file": base["checkpoint_file"],
        },
        "resources": {"head_cpus": 1, "workers": 1, "cpus_per_worker": 1},
        "search": {"searcher": searcher, "num_samples": trials, "max_concurrent": 2, "seed": seed},
        "scheduler": scheduler,
        "fixed": {
            **{
                k: v
                for k, v in base.items()
                if k not in ("data_dir", "model", "image_size", "checkpoint_file")
            },
            "seed": seed,
        },
        "space": space,
    }


def conditional_refusal(spec: dict) -> str | None:
    """Why the space loader refuses the conditional space (None: it accepts it)."""
    from ray_jobs.space import parse_space
    from sketch_core.errors import SketchError

    try:
        parse_space(spec, source="conditional space")
    except SketchError as exc:
        return f"the space loader refuses it ({exc})"
    return None


def search_figures(results: Path) -> dict:
    """Trial-epochs, best val_acc, and the running best val_acc after each trial-epoch in the order
    the epochs were reported."""
    import pandas as pd

    epochs = pd.read_parquet(results / "epochs.parquet").sort_values("timestamp")
    return {
        "trial_epochs": len(epochs),
        "best_val_acc": float(epochs["val_acc"].max()),
        "running_best": epochs["val_acc"].cummax().tolist(),
    }


def epochs_to_reach(running_best: list[float], target: float) -> int | None:
    """Trial-epochs until the running best reached ``target`` (None: never)."""
    return next((index + 1 for index, best in enumerate(running_best) if best >= target), None)


def compare_to_random(runs: dict[int, dict], baseline: dict[int, dict]) -> dict:
    """Per seed against random search of the same seed: epoch fraction to within 1 point, best
    gap."""
    fractions, gaps = [], []
    for seed, run in runs.items():
        spent = epochs_to_reach(run["running_best"], baseline[seed]["best_val_acc"] - WITHIN)
        fractions.append(None if spent is None else spent / baseline[seed]["trial_epochs"])
        gaps.append(run["best_val_acc"] - baseline[seed]["best_val_acc"])
    return {
        "reached": sum(f is not None for f in fractions),
        "epoch_fraction": fractions,
        "best_gap": gaps,
    }


def sign_claim(subject: str, gaps: list[float], against: str) -> str:
    """A claim about the sign of a per-seed gap, where every seed agrees."""
    n, above, below = len(gaps), sum(g > 0 for g in gaps), sum(g < 0 for g in gaps)
    gap_text = "gap " + spread_text(spread([100 * g for g in gaps]), "{:+.1f}") + " points"
    if above == n or below == n:
        return (
            f"{subject} ended {'above' if above == n else 'below'} {against}'s best "
            f"in {n}/{n} seeds ({gap_text})"
        )
    return (
        f"no consistent claim on the best val_acc: {subject} ended above {against}'s best "
        f"in {above}/{n} seeds, below in {below}/{n} ({gap_text})"
    )


def claims(name: str, against_random: dict, runs: dict, baseline: dict) -> list[str]:
    n = len(runs)
    reached, fractions = against_random["reached"], against_random["epoch_fraction"]
    share = spread([runs[s]["trial_epochs"] / baseline[s]["trial_epochs"] for s in runs])
    lines = [
        f"{name} spent {spread_text(share, '{:.0%}')} of random search's trial-epochs "
        f"({n}/{n} seeds)"
    ]
    if reached == n:
        lines.append(
            f"{name} came within 1 point of random search's best in {n}/{n} seeds, after a median "
            f"{spread_text(spread(fractions), '{:.0%}')} of random search's trial-epochs"
        )
    else:
        lines.append(
            f"no consistent claim on reaching random's best: {name} came within 1 point of it in "
            f"{reached}/{n} seeds"
        )
    lines.append(sign_claim(name, against_random["best_gap"], "random search"))
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--trials", type=int, default=24, help="trials per search")
    parser.add_argument(
        "--epochs", type=int, default=10, help="epochs of a trial that is not stopped"
    )
    parser.add_argument("--grace", type=int, default=1, help="ASHA's grace period in epochs")
    parser.add_argument("--classes", type=int, default=16)
    parser.add_argument("--images-per-class", type=int, default=80)
    parser.add_argument(
        "--quick", action="store_true", help="2 seeds, 8 trials of 4 epochs, 8 x 40 images"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.trials, args.epochs, args.classes, args.images_per_class = 2, 8, 4, 8, 40

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-search-efficiency-") as tmp:
        tmp = Path(tmp)
        os.environ["SKETCH_CACHE_DIR"] = str(tmp / "cache")  # shared by every search's trials
        data_dir, checkpoint = head_problem(
            tmp, classes=args.classes, images_per_class=args.images_per_class
        )
        base = {
            "data_dir": str(data_dir),
            "model": "resnet18",
            "image_size": 64,
            "checkpoint_file": str(checkpoint),
            "freeze": "head",
            "augment": "none",
            "batch_size": 64,
            "num_workers": 0,
            "val_fraction": VAL_FRACTION,
        }
        from sketch_core.config import TrainConfig
        from sketch_core.engine import TrainingRun

        # Build the feature cache once, before the first search's two trials would race for it.
        first = TrainingRun(TrainConfig.from_dict({**base, "epochs": 1}))
        assert first.uses_feature_cache
        val_images = len(first.split[1])  # of seed 0's split; every seed's holds as many
        setup_s = time.perf_counter() - started

        spec = dict(base=base, trials=args.trials, epochs=args.epochs, grace=args.grace)
        refusal = conditional_refusal(search_spec(CONDITIONAL, seed=0, **spec))
        names = [RANDOM, FLAT] + ([] if refusal else [CONDITIONAL])
        runs = {name: {} for name in names}
        search_s = {name: 0.0 for name in names}
        for seed in range(args.seeds):
            for name in list(names):
                try:
                    results, wall_s = timed_search(search_spec(name, seed=seed, **spec), tmp)
                except RuntimeError as exc:
                    if name != CONDITIONAL:
                        raise
                    refusal = f"its search failed: {str(exc).splitlines()[-1]}"
                    names.remove(CONDITIONAL)
                    del runs[CONDITIONAL]
                    continue
                runs[name][seed] = search_figures(results)
                search_s[name] += wall_s
                print(
                    f"seed {seed}  {name:<32} trial-epochs {runs[name][seed]['trial_epochs']:4d}  "
                    f"best val_acc {runs[name][seed]['best_val_acc']:.4f}  ({wall_s:.0f}s)",
                    flush=True,
                )

    baseline = runs[RANDOM]
    compared = {name: compare_to_random(runs[name], baseline) for name in names if name != RANDOM}
    table, figures, lines = [], {}, []
    for name in names:
        seeds = runs[name]
        figure = {
            "trial_epochs": spread([r["trial_epochs"] for r in seeds.values()]),
            "best_val_acc": spread([r["best_val_acc"] for r in seeds.values()]),
            "search_s": round(search_s[name] / len(seeds), 1),
        }
        if name in compared:
            figure.update(
                reached=compared[name]["reached"],
                epoch_fraction=spread(compared[name]["epoch_fraction"]),
                best_gap_vs_random=spread(compared[name]["best_gap"]),
            )
            lines += claims(name, compared[name], seeds, baseline)
        figures[name] = figure
        table.append(
            (
                name,
                spread_text(figure["trial_epochs"], "{:.0f}"),
                spread_text(figure["best_val_acc"], "{:.4f}"),
                f"{figure['reached']}/{len(seeds)}" if name in compared else "-",
                spread_text(figure["epoch_fraction"], "{:.0%}") if name in compared else "-",
            )
        )
    if CONDITIONAL in names:
        gaps = [
            runs[CONDITIONAL][s]["best_val_acc"] - runs[FLAT][s]["best_val_acc"] for s in runs[FLAT]
        ]
        lines.append(sign_claim("conditional TPE", gaps, "flat TPE"))
        figures["conditional_minus_flat_best"] = spread(gaps)
    else:
        lines.append(f"conditional row written but not measured: {refusal}")

    print(
        f"\n{args.seeds} seeds; per search {args.trials} head-only trials of up to {args.epochs} "
        "epochs, resnet18 at "
        f"64 px frozen after brief training, {args.classes * args.images_per_class} demo images "
        f"({args.classes} classes, {val_images} validation images); set-up {setup_s:.0f}s, "
        f"all {time.perf_counter() - started:.0f}s"
    )
    print("median (min..max) over seeds")
    print_table(("search", "trial-epochs", "best val_acc", "within 1 pt", "epoch fraction"), table)
    for line in lines:
        print(line)
    print(
        json.dumps(
            {
                "seeds": args.seeds,
                "trials": args.trials,
                "epochs": args.epochs,
                "grace_period": args.grace,
                "images": args.classes * args.images_per_class,
                "classes": args.classes,
                "val_images": val_images,
                "conditional_measured": CONDITIONAL in names,
                "searches": figures,
                "claims": lines,
                "cpus": len(os.sched_getaffinity(0)),
                "wall_s": round(time.perf_counter() - started, 1),
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
