"""Images/s of the project's loader against the straightforward per-sample loader.

    python bench/dataloader.py            # 600 JPEGs of 400-800 px, 448 px, 'sketch' preset, 2 workers
    python bench/dataloader.py --quick    # fewer images and epochs

Ours: ``DecodeCache`` (decode + letterbox once per node, uint8 memory map) -> ``AugmentedImages``
(augmentation on uint8) -> ``timm`` ``fast_collate`` (uint8 batches) -> ``PrefetchLoader``
(normalise to float on the device; here the CPU, so that cost is inside the measurement).
Baseline: a Dataset that per item runs ``cv2.imread`` + albumentations (LongestMaxSize, PadIfNeeded,
the same augmentation preset, Normalize, ToTensorV2), batched by the default collate.
Both deliver the same normalised float batches from the same files, augmentation and worker count.
The decode cache is built once per node: its build time is reported apart, and images/s is the
median over the steady-state epochs (2 and later; epoch 1 includes worker start-up).

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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import albumentations as A  # noqa: E402
import cv2  # noqa: E402
import torch  # noqa: E402
from albumentations.pytorch import ToTensorV2  # noqa: E402
from timm.data.loader import PrefetchLoader, fast_collate  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

from sketch_core.data import load_rgb, read_train_table  # noqa: E402
from sketch_core.dataset import AugmentedImages, DecodeCache  # noqa: E402
from sketch_core.demo_data import generate  # noqa: E402
from sketch_core.transforms import augmentation, base_transform  # noqa: E402

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet, as most timm backbones


class PerSampleImages(Dataset):
    """The straightforward loader: decode, resize, augment, normalise and convert every item."""

    def __init__(self, paths, targets, augment: str, image_size: int):
        self.paths, self.targets = paths, targets
        self.transform = A.Compose([*base_transform(image_size).transforms, *augmentation(augment, image_size).transforms,
                                    A.Normalize(mean=MEAN, std=STD), ToTensorV2()])

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        return self.transform(image=load_rgb(self.paths[index]))["image"], int(self.targets[index])


def time_epochs(loader, epochs: int) -> list[float]:
    """Seconds per full pass over ``loader`` (each batch's tensors touched, as training would)."""
    seconds = []
    for _ in range(epochs):
        started = time.perf_counter()
        checksum = 0.0
        for images, targets in loader:
            checksum += float(images[0, 0, 0, 0]) + int(targets[0])
        seconds.append(time.perf_counter() - started)
    return seconds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="200 images, 3 epochs: a smoke run")
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--epochs", type=int, default=4, help="per loader; epochs 2+ are measured")
    parser.add_argument("--image-size", type=int, default=448)
    parser.add_argument("--augment", default="sketch", help="preset for both loaders (sketch: flip + rotate ...)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args(argv)
    if args.quick:
        args.images, args.epochs = 200, 3
    torch.set_num_threads(max(1, os.cpu_count() or 1))

    with tempfile.TemporaryDirectory(prefix="bench-dataloader-") as tmp:
        started = time.perf_counter()
        classes = 10
        data_dir = generate(Path(tmp) / "data", classes=classes, images_per_class=max(2, args.images // classes),
                            test_images=1, min_size=400, max_size=800, seed=0)
        table = read_train_table(data_dir)
        generate_s = time.perf_counter() - started
        options = dict(batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
                       persistent_workers=args.workers > 0, drop_last=False)

        started = time.perf_counter()
        cache = DecodeCache(table.paths, args.image_size, cache_dir=Path(tmp) / "cache", build_workers=args.workers)
        cache_build_s = time.perf_counter() - started
        ours = PrefetchLoader(DataLoader(AugmentedImages(cache, table.targets, args.augment, args.image_size),
                                         collate_fn=fast_collate, **options),
                              mean=MEAN, std=STD, device=torch.device("cpu"))
        ours_s = time_epochs(ours, args.epochs)
        del ours

        baseline = DataLoader(PerSampleImages(table.paths, table.targets, args.augment, args.image_size), **options)
        baseline_s = time_epochs(baseline, args.epochs)
        del baseline

    count = len(table.paths)
    ours_rate = count / statistics.median(ours_s[1:])
    baseline_rate = count / statistics.median(baseline_s[1:])
    ratio = ours_rate / baseline_rate
    print(f"{count} JPEGs of 400-800 px -> {args.image_size} px, augment={args.augment!r}, "
          f"{args.workers} workers, batch {args.batch_size}, {os.cpu_count()} CPUs, no GPU "
          f"(data generated in {generate_s:.1f}s)")
    print(f"{'loader':<44}{'epoch s (1, 2, ...)':<34}{'images/s (epochs 2+)':>20}")
    print(f"{'per-sample imread + albumentations + float':<44}{', '.join(f'{s:.2f}' for s in baseline_s):<34}"
          f"{baseline_rate:>20.0f}")
    print(f"{'decode cache + uint8 + PrefetchLoader':<44}{', '.join(f'{s:.2f}' for s in ours_s):<34}{ours_rate:>20.0f}")
    print(f"decode cache build (once per node and image size): {cache_build_s:.2f}s "
          f"= {count / cache_build_s:.0f} images/s; steady-state ratio {ratio:.2f}x (target >= 3x)")
    ours_first_epoch_ratio = (count / (cache_build_s + ours_s[0])) / (count / baseline_s[0])
    print(f"first epoch including the cache build: {ours_first_epoch_ratio:.2f}x the baseline's first epoch")
    print(json.dumps({
        "ratio": round(ratio, 3), "ours_images_per_s": round(ours_rate, 1),
        "baseline_images_per_s": round(baseline_rate, 1), "cache_build_s": round(cache_build_s, 3),
        "ours_epoch_s": [round(s, 3) for s in ours_s], "baseline_epoch_s": [round(s, 3) for s in baseline_s],
        "first_epoch_ratio_with_build": round(ours_first_epoch_ratio, 3), "images": count,
        "image_size": args.image_size, "augment": args.augment, "workers": args.workers,
        "batch_size": args.batch_size, "cpus": os.cpu_count(), "device": "cpu", "target_ratio": 3.0,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
