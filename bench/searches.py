"""What the Ray benchmarks share: a small demo data set and a real search run with ray_jobs/tune.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]


def small_demo_data(folder: Path) -> Path:
    sys.path.insert(0, str(REPO_ROOT))
    from sketch_core.demo_data import generate

    return generate(folder / "data", classes=8, images_per_class=40, test_images=8, min_size=96, max_size=128)


def demo_space(data_dir: Path, experiment: str, **sections) -> dict:
    space = {
        "experiment": experiment, "data": {"dir": str(data_dir)},
        "model": {"name": "test_resnet", "pretrained": False, "image_size": 48},
        "resources": {"workers": 1, "cpus_per_worker": 0.9},
        "search": {"max_concurrent": 2, "seed": 0},
        "fixed": {"batch_size": 16, "num_workers": 0, "weight_decay": 0.01},
    }
    for name, values in sections.items():
        space[name] = {**space.get(name, {}), **values}
    return space


def run_search(space: dict, folder: Path) -> Path:
    """Run the search as a user would; returns results/<experiment>/."""
    space_file = folder / f"{space['experiment']}.yaml"
    space_file.write_text(yaml.safe_dump(space))
    subprocess.run([sys.executable, str(REPO_ROOT / "ray_jobs" / "tune.py"), "--space", str(space_file),
                    "--results", str(folder / "results")], check=True, capture_output=True)
    return folder / "results" / space["experiment"]
