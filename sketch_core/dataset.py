"""Datasets of uint8 images, and the per-node decode cache they read from.

Decoding 400-800 px JPEGs dominates the CPU side, and every trial re-reads the same images every
epoch. ``DecodeCache`` decodes and resizes each image once per node into a uint8 memory map
keyed by the files, the image size and the resize policy; every later trial and epoch on that
node reads it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from sketch_core.data import load_rgb
from sketch_core.io import build_once, file_fingerprint, progress
from sketch_core.transforms import augmentation, base_transform, seed_pipeline, to_chw

# Bump when base_transform changes, so caches built by older code are not reused.
BASE_TRANSFORM_VERSION = 1


def default_cache_dir() -> Path:
    return Path(os.environ.get("SKETCH_CACHE_DIR", Path.home() / ".cache" / "sketch-hpo"))


class DecodedImages(Dataset):
    """Image ``i`` of ``paths`` decoded and made square at ``image_size`` by policy ``resize``
    (``transforms.base_transform``): HxWx3 uint8."""

    def __init__(self, paths: Sequence[str], image_size: int, *, resize: str = "letterbox"):
        self.paths = list(paths)
        self.image_size = image_size
        self.resize = resize
        self._base = base_transform(image_size, resize=resize)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> np.ndarray:
        return self._base(image=load_rgb(self.paths[index]))["image"]


def images_key(paths: Sequence[str], image_size: int, *, resize: str) -> str:
    """A digest of the base images of ``paths`` at ``image_size`` under policy ``resize``: changes
    with any file (path, size, modification time), the size, the policy or the base-transform
    version."""
    digest = hashlib.sha256()
    digest.update(json.dumps([BASE_TRANSFORM_VERSION, image_size, resize]).encode())
    for path in paths:
        digest.update(f"{file_fingerprint(path)}\n".encode())
    return digest.hexdigest()[:24]


class DecodeCache(Dataset):
    """The same images as ``DecodedImages``, read from a node-local memory map built once.

    The key covers every path with its size and modification time, the image size, the resize
    policy and the base-transform version, so any change to the data, the size or the policy
    builds a new cache (a letterbox cache is never read for a stretch run).
    Several processes may open the same cache at once: one builds it under a file lock, the
    others wait and then read it.
    """

    def __init__(
        self,
        paths: Sequence[str],
        image_size: int,
        cache_dir: str | Path | None = None,
        build_workers: int = 2,
        *,
        resize: str = "letterbox",
    ):
        self.paths = list(paths)
        self.image_size = image_size
        self.resize = resize
        self.file = Path(cache_dir or default_cache_dir()) / f"decoded-{self.key()}.u8"
        self._array: np.ndarray | None = None
        build_once(self.file, lambda partial: self._build(partial, build_workers))

    def key(self) -> str:
        return images_key(self.paths, self.image_size, resize=self.resize)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self.paths), self.image_size, self.image_size, 3)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> np.ndarray:
        if self._array is None:  # opened lazily so DataLoader workers each map it themselves
            self._array = np.memmap(self.file, dtype=np.uint8, mode="r", shape=self.shape)
        return self._array[index]

    def __getstate__(self):
        return {**self.__dict__, "_array": None}

    def _build(self, partial: Path, workers: int) -> None:
        array = np.memmap(partial, dtype=np.uint8, mode="w+", shape=self.shape)
        loader = DataLoader(
            DecodedImages(self.paths, self.image_size, resize=self.resize),
            batch_size=32,
            num_workers=workers,
            collate_fn=np.stack,
        )
        start = 0
        for batch in progress(loader, f"decoding {len(self.paths)} images once for this node"):
            array[start : start + len(batch)] = batch
            start += len(batch)
        array.flush()
        del array


class AugmentedImages(Dataset):
    """(CHW uint8 image, target) pairs: base images from ``images`` with preset ``augment`` applied.

    Item ``i`` is augmented with draws fixed by (``seed``, epoch, ``i``); the epoch comes with the
    index from an ``EpochSampler`` (a plain integer index means epoch 0). So the draws differ across
    images and epochs, and the same seed gives the same draws in any loader worker, on any rank, in
    a second run and after a resume.
    """

    def __init__(
        self,
        images: Dataset,
        targets: Sequence[int],
        augment: str,
        image_size: int,
        *,
        seed: int = 0,
    ):
        self.images = images
        self.targets = np.asarray(targets, dtype=np.int64)
        self.augment = augmentation(augment, image_size)
        self.seed = seed

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int | tuple[int, int]) -> tuple[np.ndarray, int]:
        index, epoch = index if isinstance(index, tuple) else (index, 0)
        if self.augment.transforms:
            seed_pipeline(self.augment, self.seed, epoch, index)
        image = self.augment(image=np.asarray(self.images[index]))["image"]
        return to_chw(image), int(self.targets[index])


class EpochSampler(Sampler):
    """``sampler``'s indices paired with its current epoch, ``(index, epoch)``.

    The pairs travel to the loader workers with each index, so a dataset can seed per epoch even in
    persistent workers, which keep the copy of the dataset they started with."""

    def __init__(self, sampler: DistributedSampler):
        self.sampler = sampler

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.sampler.epoch
        return ((index, epoch) for index in self.sampler)


def image_source(
    paths: Sequence[str], image_size: int, *, resize: str, cached: bool, workers: int = 2
) -> Dataset:
    """Base images for ``paths`` under policy ``resize``: from the node's decode cache, or decoded
    on every read."""
    if cached:
        return DecodeCache(paths, image_size, build_workers=workers, resize=resize)
    return DecodedImages(paths, image_size, resize=resize)


def subset(dataset: Dataset, indices: Sequence[int]) -> torch.utils.data.Subset:
    return torch.utils.data.Subset(dataset, list(indices))
