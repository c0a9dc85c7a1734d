"""The feature cache: train a head on a frozen backbone's features, computed once per node.

Under the ``head`` freeze policy the backbone is a fixed function of the image (its weights never
change and it stays in eval mode), so running it every epoch recomputes the same numbers. Here
each *view* of every training image is encoded once and stored under the node-local cache dir;
the head then trains on batches of those tensors.

- A view is preset ``augment`` applied with a seed fixed by (view, image index). Without
  augmentation there is one view, the plain image; with augmentation ``feature_views`` views are
  encoded and epoch ``e`` trains on view ``e % feature_views``. Validation uses the plain view.
- A cache file holds one view of all images of ``train.csv`` (whatever the split or fold), keyed
  by everything its numbers depend on: model name, pretrained flag and checkpoint file, a digest
  of the backbone's weights (another seed's random init or other weights never share a file),
  normalisation, compute precision, the decoded images (the ``DecodeCache`` key: files with size
  and mtime, image size, resize policy), the augmentation (its full definition) and the view.
- Features are computed the way the uncached model computes them (``PrefetchLoader``
  normalisation, eval mode, the run's autocast) and stored in the dtype the backbone produced, so
  the head sees the same inputs either way.
- Mixup/CutMix mix images, and a mix of two images' features is not the feature of the mixed
  image: with those on, training falls back to images (see ``TrainConfig.uses_feature_cache``).
- A process keeps the last frozen backbone it built (with its weights digest) and the features
  it loaded for it, on the device it trains on: Ray Tune reuses a head-only trial's process for
  the next trial, which then costs its epochs rather than building, hashing and loading again.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset, Sampler

from sketch_core.config import TrainConfig
from sketch_core.dataset import AugmentedImages, default_cache_dir, images_key
from sketch_core.io import build_once, file_fingerprint
from sketch_core.models import create_backbone
from sketch_core.transforms import augmentation

# Bump when the way features are computed or stored changes, so older files are not reused.
FEATURE_CACHE_VERSION = 3


def training_views(config: TrainConfig) -> list[tuple[str, int]]:
    """(augmentation preset, view index) of each view the head trains on, in epoch order."""
    if config.augment == "none":
        return [("none", 0)]
    return [(config.augment, view) for view in range(config.feature_views)]


PLAIN_VIEW = ("none", 0)  # what validation (and augment=none training) reads


# What this process keeps for its next run: one frozen backbone (key, module, weights digest), and
# the features loaded for it by (file, device). EVA02-L's weights are 1.2 GB: one backbone at a
# time.
_kept_backbone: tuple[tuple, nn.Module, str] | None = None
_kept_features: dict[tuple[str, str], torch.Tensor] = {}


def frozen_backbone(config: TrainConfig, device: torch.device) -> tuple[nn.Module, str]:
    """The frozen backbone of a run training its head on features (eval mode, no gradients, on
    ``device``) and its weights digest: built once per process for the same model and weights."""
    global _kept_backbone
    random_init = not config.pretrained and not config.checkpoint_file
    key = (
        config.model,
        config.pretrained,
        file_fingerprint(config.checkpoint_file),
        config.drop_path_rate,
        config.seed if random_init else None,
        str(device),
    )
    if _kept_backbone is None or _kept_backbone[0] != key:
        _kept_backbone = None  # free the previous one (and its features) before building
        _kept_features.clear()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)  # as TrainingRun seeds before building any model
            backbone = create_backbone(
                config.model,
                pretrained=config.pretrained,
                checkpoint_file=config.checkpoint_file,
                drop_path_rate=config.drop_path_rate,
            )
        backbone = backbone.to(device).eval().requires_grad_(False)
        _kept_backbone = (key, backbone, weights_digest(backbone))
    return _kept_backbone[1], _kept_backbone[2]


def weights_digest(module: nn.Module) -> str:
    """sha256 of every tensor of ``module.state_dict()`` with its name, dtype and shape."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


class FeatureStore:
    """Cached features of one frozen backbone (``weights``: its ``weights_digest``) over the base
    images ``images`` (a ``DecodeCache`` or ``DecodedImages``: anything with ``paths``,
    ``image_size`` and ``resize``), one file per view.

    ``encode(dataset)`` computes the features of a dataset of (CHW uint8 image, target) pairs, in
    order, as an (N, num_features) tensor. Several processes may ask for the same view at once: one
    computes it under a file lock, the others wait and then read it.
    """

    def __init__(
        self,
        weights: str,
        images: Dataset,
        encode: Callable[[Dataset], torch.Tensor],
        *,
        model: str,
        pretrained: bool,
        checkpoint_file: str,
        mean: Sequence[float],
        std: Sequence[float],
        precision: str,
        cache_dir: str | Path | None = None,
    ):
        self.images = images
        self.image_size = images.image_size
        self.encode = encode
        self.dir = Path(cache_dir or default_cache_dir())
        self.identity = {
            "version": FEATURE_CACHE_VERSION,
            "model": model,
            "pretrained": pretrained,
            "checkpoint_file": file_fingerprint(checkpoint_file),
            "weights": weights,
            "mean": [float(v) for v in mean],
            "std": [float(v) for v in std],
            "precision": precision,
            "images": images_key(images.paths, images.image_size, resize=images.resize),
            "image_size": images.image_size,
            "resize": images.resize,
        }

    def key(self, augment: str, view: int) -> str:
        identity = {
            **self.identity,
            "augment": repr(augmentation(augment, self.image_size)),
            "view": view,
        }
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:24]

    def file(self, augment: str, view: int) -> Path:
        return self.dir / f"features-{self.key(augment, view)}.pt"

    def features(self, augment: str, view: int, device: torch.device | None = None) -> torch.Tensor:
        """(N, num_features) features of view ``view`` of preset ``augment`` of every image, on
        ``device`` (default: the CPU), kept in this process for later runs."""
        file = self.file(augment, view)
        kept = (str(file), str(device or "cpu"))
        if kept not in _kept_features:
            build_once(file, lambda partial: self._build(partial, augment, view))
            _kept_features[kept] = torch.load(
                file, map_location="cpu", mmap=True, weights_only=True
            ).to(device or "cpu")
        return _kept_features[kept]

    def _build(self, partial: Path, augment: str, view: int) -> None:
        # View v's draws for image i are fixed by (v, i): the same in any process, worker or batch.
        images = AugmentedImages(
            self.images, np.zeros(len(self.images)), augment, self.image_size, seed=view
        )
        features = self.encode(images)
        if len(features) != len(self.images):
            raise RuntimeError(
                f"encode returned {len(features)} features for {len(self.images)} images"
            )
        torch.save(features.contiguous(), partial)


@torch.no_grad()
def encode_batches(
    forward: Callable[[torch.Tensor], torch.Tensor], batches, autocast
) -> torch.Tensor:
    """Concatenated ``forward(images)`` over ``(images, _)`` batches, under ``autocast()``, on the
    CPU. The caller puts the backbone in eval mode."""
    outputs = []
    for images, _ in batches:
        with autocast():
            outputs.append(forward(images).detach().cpu())
    return torch.cat(outputs)


class FeatureBatches:
    """Batches of cached features standing in for a loader of image batches.

    Yields (features, targets) on ``device`` for the images ``rows`` (indices into the views):
    in the order ``sampler`` gives positions in ``rows`` (the image loader's DistributedSampler,
    so every rank trains on its shard, in the same order as with images), or in order without
    one. Epoch ``e`` (the sampler's ``set_epoch``) reads ``views[e % len(views)]``.
    """

    def __init__(
        self,
        views: Sequence[torch.Tensor],
        rows: Sequence[int],
        targets: Sequence[int],
        *,
        batch_size: int,
        device: torch.device,
        sampler: Sampler | None = None,
        drop_last: bool = False,
    ):
        self.views = list(views)
        self.rows = torch.as_tensor(np.asarray(rows, dtype=np.int64))
        self.targets = torch.as_tensor(np.asarray(targets, dtype=np.int64)).to(device)
        self.batch_size = batch_size
        self.device = device
        self.sampler = sampler
        self.drop_last = drop_last
        self._current: tuple[int, torch.Tensor] | None = None

    def __len__(self) -> int:
        count = len(self.sampler) if self.sampler is not None else len(self.rows)
        return count // self.batch_size if self.drop_last else math.ceil(count / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        features = self._view(getattr(self.sampler, "epoch", 0) % len(self.views))
        if self.sampler is not None:
            order = torch.as_tensor(list(self.sampler), dtype=torch.int64, device=self.device)
        else:
            order = torch.arange(len(self.rows), device=self.device)
        for batch in range(len(self)):
            positions = order[batch * self.batch_size : (batch + 1) * self.batch_size]
            yield features[positions], self.targets[positions]

    def _view(self, index: int) -> torch.Tensor:
        """This view's rows on the device (kept while consecutive epochs read the same view)."""
        if self._current is None or self._current[0] != index:
            self._current = None  # free the previous view first
            view = self.views[index]
            self._current = (index, view[self.rows.to(view.device)].to(self.device))
        return self._current[1]
