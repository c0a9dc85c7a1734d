"""Shared fixtures: small real data sets made by the demo generator, and a private decode cache."""

import os
from pathlib import Path

import pytest

from sketch_core.demo_data import generate

REPO_ROOT = Path(__file__).resolve().parents[1]

# Small enough for 2 CPU cores, varied enough that a tiny model learns well above chance.
LEARNABLE = dict(classes=8, images_per_class=40, test_images=80, min_size=96, max_size=128, seed=3)
# A configuration test_resnet learns on it in seconds (about 0.7 val_acc against 0.125 chance).
QUICK_TRAINING = dict(model="test_resnet", image_size=48, batch_size=16, lr=5e-3, weight_decay=0.01,
                      augment="light", num_workers=0)


@pytest.fixture(scope="session", autouse=True)
def private_cache_dir(tmp_path_factory):
    """Keep the per-node decode cache out of the user's home during tests."""
    path = tmp_path_factory.mktemp("decode-cache")
    os.environ["SKETCH_CACHE_DIR"] = str(path)
    return path


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> Path:
    """A read-only demo data set shared by every test that does not modify data."""
    return generate(tmp_path_factory.mktemp("demo") / "data", **LEARNABLE)
