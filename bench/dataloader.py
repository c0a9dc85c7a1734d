"""Images/s of the project's loader against the straightforward per-sample loader.

    python bench/dataloader.py          # 600 JPEGs of 400-800 px, 448 px, 'sketch' preset,
                                        # 2 workers
    python bench/dataloader.py --quick  # fewer images and epochs

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

import albumentations as A
import numpy as np
import torch
from albumentations.pytorch import ToTensorV2
from timm.data.loader import PrefetchLoader, fast_collate
from torch.utils.data import DataLoader, Dataset

from sketch_core.data import load_rgb, read_train_table
from sketch_core.dataset import AugmentedImages, DecodeCache
from sketch_core.demo_data import generate
from sketch_core.transforms import augmentation, base_transform, to_chw

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet, as most timm backbones
BASELINE = "per-sample imread + albumentations + float"
MIDDLE = "decode cache, still float per sample"
OURS = "decode cache + uint8 + PrefetchLoader (ours)"
UINT8_ONLY = "ours without normalising (as a GPU gets it)"


class PerSampleImages(Dataset):
    """The straightforward loader: decode, resize, augment, normalise and convert every item."""

    def __init__(self, paths, targets, augment: str, image_size: int):
        self.paths, self.targets = paths, targets
        self.transform = A.Compose(
            [
                *base_transform(image_size).transforms,
                *augmentation(augment, image_size).transforms,
                A.Normalize(mean=MEAN, std=STD),
                ToTensorV2(),
            ]
        )

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, index):
        return self.transform(image=load_rgb(self.paths[index]))["image"], int(self.targets[index])


class DecodeCacheFloat(PerSampleImages):
    """The middle way: images from the decode cache, but still normalised to float per sample."""

    def __init__(self, cache, targets, augment: str, image_size: int):
        self.images, self.targets = cache, targets
        self.transform = A.Compose(
            [
                *augmentation(augment, image_size).transforms,
                A.Normalize(mean=MEAN, std=STD),
                ToTensorV2(),
            ]
        )

    def __getitem__(self, index):
        return self.transform(image=self.images[index])["image"], int(self.targets[index])


def one_epoch(loader) -> float:
    """Seconds for a full pass over ``loader`` (each batch's tensors touched, as training would)."""
    started = time.perf_counter()
    checksum = 0.0
    for images, targets in loader:
        checksum += float(images[0, 0, 0, 0]) + int(targets[0])
    return time.perf_counter() - started


def interleaved_epochs(loaders: dict, epochs: int) -> dict[str, list[float]]:
    """Epoch times of every loader, taking turns epoch by epoch so that a change in the machine's
    load (other jobs on a shared node) hits all of them alike."""
    seconds = {name: [] for name in loaders}
    for _ in range(epochs):
        for name, loader in loaders.items():
            seconds[name].append(one_epoch(loader))
    return seconds


def time_split(paths, cache, augment: str, image_size: int, samples: int = 40) -> dict[str, float]:
    """Milliseconds per image of each stage, in this process (one core): where the time goes."""
    letterbox, augmenter = base_transform(image_size), augmentation(augment, image_size)
    to_float = A.Compose([A.Normalize(mean=MEAN, std=STD), ToTensorV2()])
    mean = torch.tensor(MEAN).view(1, 3, 1, 1) * 255
    std = torch.tensor(STD).view(1, 3, 1, 1) * 255
    stages = {
        "imread": lambda i: load_rgb(paths[i]),
        "imread+letterbox": lambda i: letterbox(image=load_rgb(paths[i]))["image"],
        "cache read": lambda i: np.array(cache[i]),
        "augment (uint8)": lambda i: augmenter(image=cache[i])["image"],
        "normalise+ToTensor per sample": lambda i: to_float(image=cache[i])["image"],
        "uint8 CHW + normalise in batch": lambda i: (
            torch.from_numpy(to_chw(cache[i]))[None].float().sub_(mean).div_(std)
        ),
    }
    split = {}
    for name, stage in stages.items():
        started = time.perf_counter()
        for index in range(samples):
            stage(index % len(paths))
        split[name] = (time.perf_counter() - started) / samples * 1e3
    return split


def normalise_batch_ms(batch_size: int, image_size: int, repeats: int = 5) -> float:
    """Milliseconds PrefetchLoader takes to normalise one uint8 batch on the CPU (in the main
    process)."""
    batch = torch.randint(0, 256, (batch_size, 3, image_size, image_size), dtype=torch.uint8)
    mean = torch.tensor(MEAN).view(1, 3, 1, 1) * 255
    std = torch.tensor(STD).view(1, 3, 1, 1) * 255
    started = time.perf_counter()
    for _ in range(repeats):
        batch.to(torch.float32).sub_(mean).div_(std)
    return (time.perf_counter() - started) / repeats * 1e3


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="200 images, 3 epochs: a smoke run")
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--epochs", type=int, default=4, help="per loader; epochs 2+ are measured")
    parser.add_argument("--image-size", type=int, default=448)
    parser.add_argument(
        "--augment", default="sketch", help="preset for both loaders (sketch: flip + rotate ...)"
    )
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args(argv)
    if args.quick:
        args.images, args.epochs = 200, 3

    with tempfile.TemporaryDirectory(prefix="bench-dataloader-") as tmp:
        started = time.perf_counter()
        classes = 10
        data_dir = generate(
            Path(tmp) / "data",
            classes=classes,
            images_per_class=max(2, args.images // classes),
            test_images=1,
            min_size=400,
            max_size=800,
            seed=0,
        )
        table = read_train_table(data_dir)
        generate_s = time.perf_counter() - started
        options = dict(
            batch_size=args.batch_size,
            shuffle=True,
            num_workers=args.workers,
            persistent_workers=args.workers > 0,
            drop_last=False,
        )

        started = time.perf_counter()
        cache = DecodeCache(
            table.paths, args.image_size, cache_dir=Path(tmp) / "cache", build_workers=args.workers
        )
        cache_build_s = time.perf_counter() - started
        loaders = {
            BASELINE: DataLoader(
                PerSampleImages(table.paths, table.targets, args.augment, args.image_size),
                **options,
            ),
            MIDDLE: DataLoader(
                DecodeCacheFloat(cache, table.targets, args.augment, args.image_size), **options
            ),
            OURS: PrefetchLoader(
                DataLoader(
                    AugmentedImages(cache, table.targets, args.augment, args.image_size),
                    collate_fn=fast_collate,
                    **options,
                ),
                mean=MEAN,
                std=STD,
                device=torch.device("cpu"),
            ),
            UINT8_ONLY: DataLoader(
                AugmentedImages(cache, table.targets, args.augment, args.image_size),
                collate_fn=fast_collate,
                **options,
            ),
        }
        load_before = os.getloadavg()[0]
        seconds = interleaved_epochs(loaders, args.epochs)
        load_after = os.getloadavg()[0]
        del loaders
        split = time_split(table.paths, cache, args.augment, args.image_size)
        batch_normalise_ms = normalise_batch_ms(args.batch_size, args.image_size)

    count = len(table.paths)
    rates = {name: count / statistics.median(times[1:]) for name, times in seconds.items()}
    ratio = rates[OURS] / rates[BASELINE]
    print(
        f"{count} JPEGs of 400-800 px -> {args.image_size} px, augment={args.augment!r}, "
        f"{args.workers} workers, batch {args.batch_size}, {len(os.sched_getaffinity(0))} CPUs, "
        "normalised on the CPU; "
        f"load average {load_before:.1f} -> {load_after:.1f} (data generated in {generate_s:.1f}s)"
    )
    print(f"{'loader':<46}{'epoch s (1, 2, ...)':<36}{'images/s (2+)':>14}{'ratio':>8}")
    for name, times in seconds.items():
        print(
            f"{name:<46}{', '.join(f'{s:.2f}' for s in times):<36}{rates[name]:>14.0f}"
            f"{rates[name] / rates[BASELINE]:>8.2f}"
        )
    print(
        f"decode cache build (once per node and image size): {cache_build_s:.2f}s "
        f"= {count / cache_build_s:.0f} images/s; steady-state ratio {ratio:.2f}x (target >= 3x)"
    )
    first_epoch_ratio = (count / (cache_build_s + seconds[OURS][0])) / (
        count / seconds[BASELINE][0]
    )
    print(
        f"first epoch including the cache build: {first_epoch_ratio:.2f}x "
        "the baseline's first epoch"
    )
    print(
        "time split, ms per image in one process: "
        + "; ".join(f"{name} {ms:.2f}" for name, ms in split.items())
    )
    ceiling = args.batch_size / batch_normalise_ms * 1e3
    print(
        f"PrefetchLoader normalises a batch of {args.batch_size} in {batch_normalise_ms:.1f} ms "
        f"in the main process: a ceiling of {ceiling:.0f} images/s however many workers decode "
        "and augment, when the device is the CPU"
    )
    print(
        json.dumps(
            {
                "ratio": round(ratio, 3),
                "ours_images_per_s": round(rates[OURS], 1),
                "baseline_images_per_s": round(rates[BASELINE], 1),
                "cache_build_s": round(cache_build_s, 3),
                "cache_float_per_sample_images_per_s": round(rates[MIDDLE], 1),
                "ours_epoch_s": [round(s, 3) for s in seconds[OURS]],
                "baseline_epoch_s": [round(s, 3) for s in seconds[BASELINE]],
                "first_epoch_ratio_with_build": round(first_epoch_ratio, 3),
                "images": count,
                "time_split_ms_per_image": {name: round(ms, 3) for name, ms in split.items()},
                "load_average": [round(load_before, 2), round(load_after, 2)],
                "uint8_only_images_per_s": round(rates[UINT8_ONLY], 1),
                "normalise_batch_ms": round(batch_normalise_ms, 2),
                "normalise_ceiling_images_per_s": round(ceiling, 1),
                "image_size": args.image_size,
                "augment": args.augment,
                "workers": args.workers,
                "batch_size": args.batch_size,
                "cpus": len(os.sched_getaffinity(0)),
                "device": "cpu",
                "target_ratio": 3.0,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
