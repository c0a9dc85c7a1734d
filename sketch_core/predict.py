"""Batched inference with test-time augmentation, and the submission file."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from timm.data.loader import PrefetchLoader, fast_collate
from torch import nn
from torch.utils.data import DataLoader, Subset

from sketch_core.dataset import AugmentedImages, image_source
from sketch_core.errors import SketchError
from sketch_core.io import atomic_write, progress


def predict_probs(
    model: nn.Module,
    paths: Sequence[str],
    *,
    image_size: int,
    resize: str,
    mean: Sequence[float],
    std: Sequence[float],
    device: torch.device,
    tta: bool,
    batch_size: int,
    num_workers: int,
    cached: bool,
    amp: bool,
) -> np.ndarray:
    """Class probabilities, shape (len(paths), classes): softmax, averaged over the original and
    its horizontal flip when ``tta``. A run predicts through ``TrainingRun.predict``, which passes
    its own settings. ``resize`` must be the run's policy: the model sees the test
    images made square as its training images were. Under ``torch.distributed`` every rank
    predicts a strided shard and every rank gets the whole result."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    images = AugmentedImages(
        image_source(paths, image_size, resize=resize, cached=cached, workers=num_workers),
        np.zeros(len(paths), dtype=np.int64),
        "none",
        image_size,
    )
    shard = list(range(rank, len(paths), world_size))
    loader = PrefetchLoader(
        DataLoader(
            Subset(images, shard),
            batch_size=batch_size,
            shuffle=False,
            collate_fn=fast_collate,
            num_workers=num_workers,
            pin_memory=device.type == "cuda",
        ),
        mean=mean,
        std=std,
        device=device,
    )
    model = model.eval()
    chunks = []
    autocast = torch.autocast(
        device.type, dtype=torch.bfloat16, enabled=amp and device.type == "cuda"
    )
    with torch.no_grad(), autocast:
        for batch, _ in progress(loader, "predicting", total=len(loader)):
            probs = model(batch).float().softmax(1)
            if tta:
                probs = (probs + model(torch.flip(batch, dims=[3])).float().softmax(1)) / 2
            chunks.append(probs.cpu())
    shard_probs = torch.cat(chunks).numpy() if chunks else np.zeros((0, 0), dtype=np.float32)
    if world_size == 1:
        return shard_probs
    gathered: list = [None] * world_size
    dist.all_gather_object(gathered, (shard, shard_probs))
    classes = max(p.shape[1] for _, p in gathered)
    result = np.zeros((len(paths), classes), dtype=np.float32)
    for indices, probs in gathered:
        if len(indices):
            result[indices] = probs
    return result


def submission_frame(test_frame: pd.DataFrame, probs: np.ndarray) -> pd.DataFrame:
    """``ID,image_path,target``: one row per test.csv row, in its order."""
    if len(probs) != len(test_frame):
        raise ValueError(f"{len(probs)} predictions for {len(test_frame)} test rows")
    return pd.DataFrame(
        {
            "ID": np.arange(len(test_frame)),
            "image_path": test_frame["image_path"].to_numpy(),
            "target": probs.argmax(1),
        }
    )


def write_submission(path: str | Path, test_frame: pd.DataFrame, probs: np.ndarray) -> Path:
    """Write atomically; an existing file is never replaced."""
    path = Path(path)
    if path.exists():
        raise SketchError(f"{path}: already exists; a submission is never overwritten")
    frame = submission_frame(test_frame, probs)
    return atomic_write(path, lambda temp: frame.to_csv(temp, index=False))
