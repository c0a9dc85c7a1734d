"""albumentations pipelines, chosen by name.

Every image first goes through ``base_transform``, which makes it a square of side ``image_size``
by the run's resize policy (``TrainConfig.resize``): ``letterbox`` fits the longest side and pads
with white, so a sketch keeps its aspect ratio (a 4:5 one gets a fifth of white columns);
``stretch`` resizes each side on its own, so every pixel is the sketch's but its strokes are
stretched. Either way nothing is cropped and the result is deterministic (the decode cache stores
exactly this, keyed by the policy). Augmentations then run on that uint8 square; normalisation
happens on the device (``timm.data.PrefetchLoader``), never per sample.
"""

from __future__ import annotations

import random

import albumentations as A
import cv2
import numpy as np

from sketch_core.config import AUGMENTATIONS, RESIZE_POLICIES

WHITE = 255


def base_transform(image_size: int, *, resize: str = "letterbox") -> A.Compose:
    """The pipeline that makes an image a square of side ``image_size`` by policy ``resize``."""
    if resize not in RESIZE_POLICIES:
        raise ValueError(f"resize: expected one of {', '.join(RESIZE_POLICIES)}, got {resize!r}")
    if resize == "stretch":
        return A.Compose([A.Resize(image_size, image_size, interpolation=cv2.INTER_AREA)])
    return A.Compose(
        [
            A.LongestMaxSize(max_size=image_size, interpolation=cv2.INTER_AREA),
            A.PadIfNeeded(
                min_height=image_size,
                min_width=image_size,
                position="center",
                border_mode=cv2.BORDER_CONSTANT,
                fill=WHITE,
            ),
        ]
    )


def augmentation(name: str, image_size: int) -> A.Compose:
    """The augmentations of preset ``name`` for a square uint8 image of side ``image_size``."""
    if name not in AUGMENTATIONS:
        raise ValueError(f"augment: expected one of {', '.join(AUGMENTATIONS)}, got {name!r}")
    flip = A.HorizontalFlip(p=0.5)  # flipped near-duplicates exist in the real data
    geometry = A.Affine(
        rotate=(-15, 15),
        scale=(0.9, 1.1),
        translate_percent=(-0.05, 0.05),
        border_mode=cv2.BORDER_CONSTANT,
        fill=WHITE,
        p=0.7,
    )
    contrast = A.RandomBrightnessContrast(brightness_limit=0.1, contrast_limit=0.2, p=0.3)
    presets = {
        "none": [],
        "light": [flip],
        "sketch": [flip, geometry, contrast],
        "heavy": [
            flip,
            A.RandomResizedCrop(size=(image_size, image_size), scale=(0.6, 1.0), p=0.5),
            geometry,
            A.OneOf(
                [
                    A.ElasticTransform(
                        alpha=30, sigma=6, border_mode=cv2.BORDER_CONSTANT, fill=WHITE
                    ),
                    A.GridDistortion(
                        distort_limit=0.2, border_mode=cv2.BORDER_CONSTANT, fill=WHITE
                    ),
                ],
                p=0.3,
            ),
            contrast,
            A.InvertImg(p=0.1),
        ],
    }
    return A.Compose(presets[name])


def seed_pipeline(pipeline: A.Compose, *key: int) -> None:
    """Make ``pipeline``'s next draws a function of ``key`` alone (e.g. run seed, epoch, image
    index).

    albumentations 2 pipelines own their generators and ignore numpy and torch seeding, so a
    pipeline built in the parent process repeats the same draws in every forked loader worker.
    Seeding per sample makes each draw independent of which worker, rank or restarted process makes
    it. One generator is shared by the whole pipeline (``set_random_seed`` would give every
    transform the same draws)."""
    seed = int(np.random.SeedSequence(list(key)).generate_state(1)[0])
    pipeline.set_random_state(np.random.default_rng(seed), random.Random(seed))


def to_chw(image: np.ndarray) -> np.ndarray:
    """HWC uint8 to the contiguous CHW uint8 that ``timm.data.fast_collate`` stacks."""
    return np.ascontiguousarray(image.transpose(2, 0, 1))
