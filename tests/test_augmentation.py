"""Augmentation is random per sample and reproducible per seed, with loader workers and ranks; the
resize policy makes images square the same way in training and in prediction."""

import cv2
import numpy as np
import pytest
import torch
from timm.data.loader import PrefetchLoader, fast_collate
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from sketch_core.dataset import AugmentedImages, DecodedImages, EpochSampler
from sketch_core.models import create_classifier, data_config
from sketch_core.predict import predict_probs
from sketch_core.transforms import WHITE, base_transform


class OneImage(Dataset):
    """The same decoded image at every index: any difference between items is the augmentation's."""

    def __init__(self, demo_dir, length: int):
        self.image = DecodedImages([str(next((demo_dir / "train").rglob("*.JPEG")))], 48)[0]
        self.length = length

    def __len__(self):
        return self.length

    def __getitem__(self, index):
        return self.image


def draws(
    demo_dir, *, seed=0, epoch=0, rank=0, world_size=1, num_workers=2, length=8
) -> list[bytes]:
    """The augmented images a loader yields in one epoch, in order, as bytes."""
    images = AugmentedImages(OneImage(demo_dir, length), np.zeros(length), "sketch", 48, seed=seed)
    sampler = DistributedSampler(images, num_replicas=world_size, rank=rank, shuffle=False)
    sampler.set_epoch(epoch)
    loader = DataLoader(
        images,
        batch_size=1,
        sampler=EpochSampler(sampler),
        num_workers=num_workers,
        collate_fn=lambda batch: batch[0][0],
    )
    return [image.tobytes() for image in loader]


def matches(a: list[bytes], b: list[bytes]) -> int:
    """Positions at which two sequences of draws give the same image."""
    return sum(x == y for x, y in zip(a, b))


# The sketch preset leaves an image untouched, or only flips it, about one draw in ten each, so
# independent draws still coincide now and then (27 distinct images of 32 here); repeated draws
# coincide every time.
FEW = 4


def test_draws_differ_across_loader_workers_positions_and_epochs(demo_dir):
    first = draws(demo_dir, length=32)
    # Forked workers sharing one unseeded pipeline repeat each other's draws: with batches of one
    # and 2 workers, item 2k (worker 0) equalled item 2k+1 (worker 1), 16 distinct images of 32.
    assert matches(first[0::2], first[1::2]) <= FEW and len(set(first)) >= 24
    assert matches(first, draws(demo_dir, epoch=1, length=32)) <= FEW


def test_draws_differ_across_ranks(demo_dir):
    rank0, rank1 = (draws(demo_dir, rank=rank, world_size=2, length=32) for rank in (0, 1))
    assert len(rank0) == len(rank1) == 16 and matches(rank0, rank1) <= FEW


def test_the_same_seed_gives_the_same_draws_whatever_the_workers(demo_dir):
    first = draws(demo_dir, epoch=3, length=32)
    assert draws(demo_dir, epoch=3, length=32) == first
    assert (
        draws(demo_dir, epoch=3, length=32, num_workers=0) == first
    )  # a restarted process, no workers
    assert matches(draws(demo_dir, epoch=3, length=32, seed=1), first) <= FEW


@pytest.mark.parametrize("augment", ["none", "light", "sketch", "heavy"])
def test_every_preset_keeps_the_image_shape_and_type(demo_dir, augment):
    images = AugmentedImages(OneImage(demo_dir, 2), np.zeros(2), augment, 48, seed=0)
    image, target = images[(1, 2)]
    assert image.shape == (3, 48, 48) and image.dtype == np.uint8 and target == 0


def portrait_sketches(folder, count=3) -> list[str]:
    """``count`` 4:5 (32 x 40 px) PNGs of dark noise: no pixel of theirs is white."""
    rng = np.random.default_rng(0)
    paths = []
    for index in range(count):
        path = str(folder / f"portrait-{index}.png")
        cv2.imwrite(path, rng.integers(0, 128, size=(40, 32, 3), dtype=np.uint8))
        paths.append(path)
    return paths


def white_lines(image: np.ndarray) -> tuple[int, int]:
    """(rows, columns) of ``image`` that are white all along."""
    white = (image == WHITE).all(axis=2)
    return int(white.all(axis=1).sum()), int(white.all(axis=0).sum())


def test_stretch_fills_the_square_and_letterbox_pads_it_with_white():
    portrait = np.zeros((40, 32, 3), dtype=np.uint8)  # 4:5, black: any white pixel is padding
    stretched = base_transform(20, resize="stretch")(image=portrait)["image"]
    letterboxed = base_transform(20, resize="letterbox")(image=portrait)["image"]
    assert stretched.shape == letterboxed.shape == (20, 20, 3)
    assert white_lines(stretched) == (0, 0)
    assert white_lines(letterboxed) == (0, 4)  # 16 px of sketch between two 2 px white bands
    assert (letterboxed[:, :2] == WHITE).all() and (letterboxed[:, -2:] == WHITE).all()
    assert np.array_equal(base_transform(20)(image=portrait)["image"], letterboxed)  # the default
    with pytest.raises(ValueError, match="resize: expected one of letterbox, stretch, got 'crop'"):
        base_transform(20, resize="crop")


def test_prediction_makes_test_images_square_by_the_runs_policy(tmp_path):
    paths = portrait_sketches(tmp_path)
    torch.manual_seed(0)
    model = create_classifier("test_resnet", num_classes=3).eval()
    normalisation = data_config(model)

    def predicted(resize, cached=False):
        return predict_probs(
            model,
            paths,
            image_size=32,
            resize=resize,
            mean=normalisation["mean"],
            std=normalisation["std"],
            device=torch.device("cpu"),
            tta=False,
            batch_size=8,
            num_workers=0,
            cached=cached,
            amp=False,
        )

    def direct(resize):  # the model on the images as training decodes them
        images = AugmentedImages(
            DecodedImages(paths, 32, resize=resize), np.zeros(len(paths)), "none", 32
        )
        loader = PrefetchLoader(
            DataLoader(images, batch_size=len(paths), collate_fn=fast_collate),
            mean=normalisation["mean"],
            std=normalisation["std"],
            device=torch.device("cpu"),
        )
        ((batch, _),) = list(loader)
        with torch.no_grad():
            return model(batch).softmax(1).numpy()

    stretched, letterboxed = predicted("stretch"), predicted("letterbox")
    assert np.allclose(stretched, direct("stretch"), atol=1e-6)
    assert np.allclose(
        predicted("stretch", cached=True), stretched, atol=1e-6
    )  # through the decode cache
    assert np.allclose(letterboxed, direct("letterbox"), atol=1e-6)
    assert not np.allclose(stretched, letterboxed, atol=1e-3)
