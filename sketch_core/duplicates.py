"""Groups of near-duplicate training images, so that no split separates the copies of one image.

ImageNet-Sketch filled the classes that had fewer than 50 images "by flipping and rotating the
images", so a class can hold an image beside its mirror, a rotated or a re-encoded copy. A split
that puts one copy in training and another in validation scores memory, not generalisation.

Method: a perceptual hash (pHash: the 12x12 lowest DCT frequencies, each above or below their
median, 144 bits) of each image's grayscale ``THUMBNAIL_SIDE`` px square, taken in every orientation
(the 8 flips and quarter turns, and those 8 again after each of ``SMALL_ROTATIONS``). Two images of
one class are linked when the upright hash of either lies within ``max_distance`` bits of some
orientation of the other's; the groups are the connected components of the links. Only images of
one class are compared: the data's copies were made within a class, and it keeps the work to the
sum of the classes' sizes squared.

The hashes are computed once per node, like the decode cache, into ``phash-v<version>-<key>.npy``
under the cache dir (key: the files' paths, sizes and modification times, ``dataset.images_key``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
from torch.utils.data import DataLoader, Dataset

from sketch_core.data import load_rgb
from sketch_core.dataset import default_cache_dir, images_key
from sketch_core.errors import SketchError
from sketch_core.io import build_once, progress, save_npy
from sketch_core.transforms import base_transform

THUMBNAIL_SIDE = 64
# 8x8 (64 bits, the usual pHash) is too coarse for thin strokes on white: in a 2,000-image demo set
# distinct sketches of one class came within 2 bits of each other; at 12x12, within 18 at the
# closest.
HASH_SIDE = 12
HASH_BITS = HASH_SIDE * HASH_SIDE
HASH_WORDS = -(-HASH_BITS // 64)  # a hash is stored as 64-bit words, the last padded with zero bits
SMALL_ROTATIONS = (
    -7.5,
    7.5,
)  # degrees: hashed as well, so that copies turned by about 5-10 degrees match
ORIENTATIONS = 8 * (1 + len(SMALL_ROTATIONS))
# Flips and quarter turns permute and negate an image's DCT coefficients exactly: a transpose
# transposes them, a flip along an axis negates the odd frequencies along it. So the coefficients
# of all 8 are those of the image and of its transpose, times each of these 4 sign patterns.
_ODD_NEGATED = (-1.0) ** np.arange(HASH_SIDE)
FLIP_SIGNS = np.stack(
    [
        np.outer(rows, columns)
        for rows in (np.ones(HASH_SIDE), _ODD_NEGATED)
        for columns in (np.ones(HASH_SIDE), _ODD_NEGATED)
    ]
)
# Bump when the hash changes, so hash files written by older code are not reused.
HASH_VERSION = 1
# Measured on copies planted in demo data (tests/test_duplicates.py, and 2,000-image sets): mirrors,
# quarter turns and re-encodes lie within 4 bits of their originals, 92-99% of 5-10 degree rotations
# within 16, and under 1 pair in 5,000 distinct images of a class.
DEFAULT_MAX_DISTANCE = 16
ROWS_PER_BLOCK = (
    64  # distances are computed in blocks of rows: a class of 1000 images would need 0.4 GB at once
)


def orientation_hashes(thumbnail: np.ndarray, aspect: float = 1.0) -> np.ndarray:
    """The hash of a square HxWx3 uint8 thumbnail in each of its ORIENTATIONS, upright first:
    (ORIENTATIONS, HASH_WORDS) uint64.

    ``aspect`` is the width / height of the image the thumbnail was stretched from: a rotation of
    that image is, in the thumbnail, a rotation sheared by the stretch."""
    gray = cv2.cvtColor(thumbnail, cv2.COLOR_RGB2GRAY).astype(np.float32)
    stretch = np.diag([1.0, aspect])
    centre = np.full(2, (len(gray) - 1) / 2)
    rotated = [gray]
    for angle in SMALL_ROTATIONS:
        turn = stretch @ cv2.getRotationMatrix2D((0, 0), angle, 1.0)[:, :2] @ np.linalg.inv(stretch)
        rotated.append(
            cv2.warpAffine(
                gray,
                np.column_stack([turn, centre - turn @ centre]),
                gray.shape[::-1],
                flags=cv2.INTER_LINEAR,
                borderMode=cv2.BORDER_REPLICATE,
            )
        )
    dcts = [cv2.dct(image)[:HASH_SIDE, :HASH_SIDE] for image in rotated]
    low = np.concatenate([block * FLIP_SIGNS for dct in dcts for block in (dct, dct.T)]).reshape(
        ORIENTATIONS, -1
    )
    bits = np.zeros((ORIENTATIONS, HASH_WORDS * 64), dtype=bool)
    bits[:, :HASH_BITS] = low > np.median(low, axis=1, keepdims=True)
    return np.packbits(bits, axis=1).view(np.uint64)


class ImageHashes(Dataset):
    """``orientation_hashes`` of image ``i`` of ``paths``, decoded by ``data.load_rgb`` and made a
    square by the ``stretch`` base transform (letterboxing pads odd margins unevenly, so a turned
    copy's thumbnail would be shifted by a pixel; stretching commutes with flips and quarter
    turns)."""

    def __init__(self, paths: Sequence[str]):
        self.paths = list(paths)
        self._base = base_transform(THUMBNAIL_SIDE, resize="stretch")

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> np.ndarray:
        image = load_rgb(self.paths[index])
        return orientation_hashes(
            self._base(image=image)["image"], aspect=image.shape[1] / image.shape[0]
        )


def image_hashes(
    paths: Sequence[str], *, cache_dir: str | Path | None = None, workers: int = 2
) -> np.ndarray:
    """``orientation_hashes`` of every image of ``paths``, (N, ORIENTATIONS, HASH_WORDS) uint64:
    read from this node's hash file, or computed (``workers`` decoding processes) and written there
    first."""
    file = Path(cache_dir or default_cache_dir()) / (
        f"phash-v{HASH_VERSION}-{images_key(paths, THUMBNAIL_SIDE, resize='stretch')}.npy"
    )
    build_once(file, lambda partial: save_npy(partial, _compute_hashes(paths, workers)))
    return np.load(file)


def duplicate_groups(
    paths: Sequence[str],
    targets: Sequence[int],
    *,
    max_distance: int = DEFAULT_MAX_DISTANCE,
    cache_dir: str | Path | None = None,
    workers: int = 2,
) -> np.ndarray:
    """A group id per image of ``paths`` (0..groups-1): near-duplicates of one class share one,
    every other image has its own. ``targets`` are the images' classes; only a class's images are
    compared."""
    targets = np.asarray(targets)
    if len(targets) != len(paths):
        raise SketchError(
            f"targets: {len(targets)} targets for {len(paths)} images; expected one per image"
        )
    if not 0 <= max_distance <= HASH_BITS:
        raise SketchError(f"max_distance: expected 0..{HASH_BITS} bits, got {max_distance}")
    hashes = image_hashes(paths, cache_dir=cache_dir, workers=workers)
    first_of_component = np.arange(len(targets))
    for target in np.unique(targets):
        members = np.flatnonzero(targets == target)
        first_of_component[members] = members[_components(hashes[members], max_distance)]
    return np.unique(first_of_component, return_inverse=True)[1]


def _components(hashes: np.ndarray, max_distance: int) -> np.ndarray:
    """For each image of ``hashes``, the position of the first image of its connected component."""
    distances = np.concatenate(
        [  # [i, j]: bits from image i upright to image j's closest orientation
            np.bitwise_count(hashes[rows, None, :1] ^ hashes[None])
            .sum(axis=3, dtype=np.int64)
            .min(axis=2)
            for rows in np.array_split(np.arange(len(hashes)), -(-len(hashes) // ROWS_PER_BLOCK))
        ]
    )
    linked = (distances <= max_distance) | (distances.T <= max_distance)
    labels = np.arange(len(hashes))
    while True:  # each image takes the smallest label it is linked to, until the labels settle
        settled = np.where(linked, labels[None, :], len(labels)).min(axis=1)
        if (settled == labels).all():
            return labels
        labels = settled


def _compute_hashes(paths: Sequence[str], workers: int) -> np.ndarray:
    batches = DataLoader(
        ImageHashes(paths), batch_size=64, num_workers=workers, collate_fn=np.stack
    )
    return np.concatenate(
        list(progress(batches, f"hashing {len(paths)} images once for this node"))
    )
