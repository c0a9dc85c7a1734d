"""albumentations pipelines, chosen by name.

Every image first goes through ``base_transform``: fit the longest side to ``image_size`` and pad
to a square with white, so a sketch is never cropped and the result is deterministic (the
decode cache stores exactly this). Augmentations then run on that uint8 square; normalisation
happens on the device (``timm.data.PrefetchLoader``), never per sample.
"""

from __future__ import annotations

import random

import albumentations as A
import cv2
import numpy as np

from sketch_core.config import AUGMENTATIONS

WHITE = 255


def base_transform(image_size: int) -> A.Compose:
    return A.Compose([
        A.LongestMaxSize(max_size=image_size, interpolation=cv2.INTER_AREA),
        A.PadIfNeeded(min_height=image_size, min_width=image_size, position="center",
                      border_mode=cv2.BORDER_CONSTANT, fill=WHITE),
    ])


def augmentation(name: str, image_size: int) -> A.Compose:
    """The augmentations of preset ``name`` for a square uint8 image of side ``image_size``."""
    if name not in AUGMENTATIONS:
        raise ValueError(f"augment: expected one of {', '.join(AUGMENTATIONS)}, got {name!r}")
    flip = A.HorizontalFlip(p=0.5)  # flipped near-duplicates exist in the real data
    geometry = A.Affine(rotate=(-15, 15), scale=(0.9, 1.1), translate_percent=(-0.05, 0.05),
                        border_mode=cv2.BORDER_CONSTANT, fill=WHITE, p=0.7)
    contrast = A.RandomBrightnessContrast(brightness_limit=0.1, contrast_limit=0.2, p=0.3)
    presets = {
        "none": [],
        "light": [flip],
        "sketch": [flip, geometry, contrast],
        "heavy": [
            flip,
            A.RandomResizedCrop(size=(image_size, image_size), scale=(0.6, 1.0), p=0.5),
            geometry,
            A.OneOf([
                A.ElasticTransform(alpha=30, sigma=6, border_mode=cv2.BORDER_CONSTANT, fill=WHITE),
                A.GridDistortion(distort_limit=0.2, border_mode=cv2.BORDER_CONSTANT, fill=WHITE),
            ], p=0.3),
            contrast,
            A.InvertImg(p=0.1),
        ],
    }
    return A.Compose(presets[name])


def seed_pipeline(pipeline: A.Compose, *key: int) -> None:
    """Make ``pipeline``'s next draws a function of ``key`` alone (e.g. run seed, epoch, image index).

    albumentations 2 pipelines own their generators and ignore numpy and torch seeding, so a pipeline
    built in the parent process repeats the same draws in every forked loader worker. Seeding per
    sample makes each draw independent of which worker, rank or restarted process makes it. One
    generator is shared by the whole pipeline (``set_random_seed`` would give every transform the
    same draws)."""
    seed = int(np.random.SeedSequence(list(key)).generate_state(1)[0])
    pipeline.set_random_state(np.random.default_rng(seed), random.Random(seed))


def to_chw(image: np.ndarray) -> np.ndarray:
    """HWC uint8 to the contiguous CHW uint8 that ``timm.data.fast_collate`` stacks."""
    return np.ascontiguousarray(image.transpose(2, 0, 1))
