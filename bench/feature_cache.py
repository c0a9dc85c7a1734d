"""Head-only epochs with the feature cache against the same training on images.

    python bench/feature_cache.py            # resnet18 at 64 px, 'sketch' augmentation, 4 views
    python bench/feature_cache.py --quick    # no backbone pre-training, fewer epochs

Both runs are ``TrainingRun``s with ``freeze: head`` on the same data, split, seed, epochs and
schedule; they differ only in ``feature_cache``. A randomly initialised backbone gives features
a head can hardly use, so the backbone is first trained briefly on a *separate* demo data set
(other images, same classes) and loaded through ``checkpoint_file``, as pretrained weights would
be. Epoch time is one epoch's wall time (training and validation), the median over epochs 2 and
later. The feature cache is built once per node and model: its build time is reported apart (the
cached run's set-up time with a cold cache minus with a warm one).

With augmentation the two runs do not see the same augmented images (the cached run cycles
through ``feature_views`` fixed views, the uncached one draws new ones every epoch), so their
accuracies agree within noise only; ``--augment none`` makes them equal.

The last line printed is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from sketch_core.config import TrainConfig
from sketch_core.demo_data import generate
from sketch_core.engine import TrainingRun


def timed_run(config: TrainConfig) -> dict:
    started = time.perf_counter()
    run = TrainingRun(config)
    setup_s = time.perf_counter() - started
    epochs, history = [], []
    iterator = run.epochs()
    while True:
        started = time.perf_counter()
        metrics = next(iterator, None)
        if metrics is None:
            break
        epochs.append(time.perf_counter() - started)
        history.append(metrics)
    return {
        "setup_s": setup_s,
        "epoch_s": epochs,
        "history": history,
        "uses_cache": run.uses_feature_cache,
    }


def pretrain_backbone(config: TrainConfig, out: Path) -> tuple[Path, float, float]:
    """Train the whole model briefly; save its backbone as a checkpoint file. Returns file, seconds,
    val_acc."""
    started = time.perf_counter()
    run = TrainingRun(config)
    history = list(run.epochs())
    torch.save(run.model.backbone.state_dict(), out)
    return out, time.perf_counter() - started, history[-1]["val_acc"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="random-init backbone, 3 epochs: a smoke run"
    )
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--augment", default="sketch")
    parser.add_argument("--feature-views", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--pretrain-epochs", type=int, default=10)
    parser.add_argument("--pretrain-lr", type=float, default=5e-3)
    parser.add_argument("--classes", type=int, default=8)
    parser.add_argument("--images-per-class", type=int, default=60)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs, args.pretrain_epochs, args.images_per_class = 3, 0, 30

    with tempfile.TemporaryDirectory(prefix="bench-feature-cache-") as tmp:
        tmp = Path(tmp)
        os.environ["SKETCH_CACHE_DIR"] = str(tmp / "cache")  # a cold node-local cache
        data = dict(classes=args.classes, test_images=1, min_size=160, max_size=400)
        data_dir = generate(tmp / "data", images_per_class=args.images_per_class, seed=3, **data)
        common = dict(
            model=args.model,
            image_size=args.image_size,
            batch_size=32,
            weight_decay=0.01,
            num_workers=args.workers,
            seed=0,
        )

        checkpoint, pretrain_s, pretrain_acc = "", 0.0, None
        if args.pretrain_epochs:
            pretrain_dir = generate(
                tmp / "pretrain", images_per_class=args.images_per_class, seed=11, **data
            )
            pretrain = TrainConfig.from_dict(
                {
                    **common,
                    "data_dir": str(pretrain_dir),
                    "freeze": "none",
                    "augment": "light",
                    "lr": args.pretrain_lr,
                    "epochs": args.pretrain_epochs,
                }
            )
            path, pretrain_s, pretrain_acc = pretrain_backbone(pretrain, tmp / "backbone.pth")
            checkpoint = str(path)

        head_only = TrainConfig.from_dict(
            {
                **common,
                "data_dir": str(data_dir),
                "freeze": "head",
                "checkpoint_file": checkpoint,
                "augment": args.augment,
                "feature_views": args.feature_views,
                "lr": 1e-2,
                "epochs": args.epochs,
            }
        )
        load = [os.getloadavg()[0]]
        uncached = timed_run(head_only.replace(feature_cache=False))
        cold = timed_run(head_only)  # builds the feature cache
        warm = timed_run(head_only)  # reads it
        assert cold["uses_cache"] and not uncached["uses_cache"]
        load.append(os.getloadavg()[0])

    def steady(result):
        return statistics.median(result["epoch_s"][1:] or result["epoch_s"])

    uncached_s, cached_s = steady(uncached), steady(warm)
    ratio = uncached_s / cached_s
    cache_build_s = max(cold["setup_s"] - warm["setup_s"], 0.0)
    acc_uncached, acc_cached = uncached["history"][-1]["val_acc"], warm["history"][-1]["val_acc"]
    views = 1 if args.augment == "none" else args.feature_views
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU only, no GPU"

    print(
        f"{args.model} at {args.image_size} px, freeze=head, augment={args.augment!r} "
        f"({views} cached view(s)), {args.classes * args.images_per_class} images, "
        f"{args.epochs} epochs, {args.workers} workers, "
        f"load average {load[0]:.1f} -> {load[1]:.1f}, "
        f"{len(os.sched_getaffinity(0))} CPUs, {device}"
    )
    if checkpoint:
        print(
            f"backbone pre-trained on separate demo data: {args.pretrain_epochs} epochs, "
            f"{pretrain_s:.1f}s, "
            f"val_acc {pretrain_acc:.3f} there"
        )
    else:
        print("backbone: random init (--quick): accuracies are near chance")
    print(
        f"{'run':<12}{'setup s':>9}{'epoch s (1, 2, ...)':>46}{'median 2+':>11}{'train img/s':>13}"
        f"{'val_acc per epoch':>40}"
    )
    for name, result in (("images", uncached), ("cache cold", cold), ("cache warm", warm)):
        epochs = ", ".join(f"{s:.3f}" for s in result["epoch_s"])
        accs = ", ".join(f"{m['val_acc']:.3f}" for m in result["history"])
        rate = statistics.median(
            m["images_per_s"] for m in result["history"][1:] or result["history"]
        )
        print(
            f"{name:<12}{result['setup_s']:>9.2f}{epochs:>46}{steady(result):>11.4f}{rate:>13.0f}{accs:>40}"
        )
    print(
        f"feature cache build (once per node, model, weights, size, view): {cache_build_s:.2f}s; "
        f"epoch speed-up {ratio:.1f}x (target >= 50x); final val_acc {acc_cached:.3f} cached vs "
        f"{acc_uncached:.3f} on images"
    )
    print(
        json.dumps(
            {
                "ratio": round(ratio, 2),
                "acc_diff": round(acc_cached - acc_uncached, 4),
                "cache_build_s": round(cache_build_s, 3),
                "uncached_epoch_s": round(uncached_s, 4),
                "cached_epoch_s": round(cached_s, 5),
                "uncached_val_acc": acc_uncached,
                "cached_val_acc": acc_cached,
                "uncached_val_acc_best": max(m["val_acc"] for m in uncached["history"]),
                "cached_val_acc_best": max(m["val_acc"] for m in warm["history"]),
                "model": args.model,
                "image_size": args.image_size,
                "augment": args.augment,
                "feature_views": views,
                "epochs": args.epochs,
                "images": args.classes * args.images_per_class,
                "pretrain_epochs": args.pretrain_epochs,
                "pretrain_s": round(pretrain_s, 2),
                "pretrain_val_acc": pretrain_acc,
                "cpus": len(os.sched_getaffinity(0)),
                "device": "cuda" if torch.cuda.is_available() else "cpu",
                "load_average": [round(v, 2) for v in load],
                "target_ratio": 50.0,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
