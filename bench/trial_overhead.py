"""How much of a trial is Ray's start-up and how much is training, for a tiny model on the demo
data, for both kinds of trial.

    python bench/trial_overhead.py [--trials 4] [--epochs 3] [--workers 2]

Runs two real searches with ray_jobs/tune.py (no early stopping): one of fine-tuning trials (each a
Ray Train TorchTrainer of --workers DDP workers) and one of head-only trials on cached features
(each in a reused Ray Tune trial process). Each trial's wall time is split using the per-epoch
times it reported: start-up = time to the first epoch minus one epoch. Prints a table, then one
JSON line: per kind, the median start-up and training seconds and the start-up share.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    import pandas as pd
    from searches import demo_space, run_search, small_demo_data

    kinds = {
        "fine-tuning (TorchTrainer)": {"freeze": "none"},
        "head-only (Tune process)": {"freeze": "head"},
    }
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        data_dir = small_demo_data(folder)
        for index, (kind, fixed) in enumerate(kinds.items()):
            space = demo_space(
                data_dir,
                f"overhead{index}",
                resources={
                    "workers": args.workers,
                    "cpus_per_worker": round(1.9 / args.workers, 2),
                },
                search={"searcher": "random", "num_samples": args.trials, "max_concurrent": 1},
                scheduler={"type": "none", "max_epochs": args.epochs},
                fixed=fixed,
            )
            epochs = pd.read_parquet(run_search(space, folder) / "epochs.parquet")
            for trial_id, trial in epochs.sort_values(["timestamp", "epoch"]).groupby(
                "trial_id", sort=False
            ):
                times = trial.sort_values("epoch")["time_total_s"].to_numpy()
                epoch_s = (times[-1] - times[0]) / max(len(times) - 1, 1)
                startup = times[0] - epoch_s
                rows.append(
                    {
                        "kind": kind,
                        "trial_id": trial_id,
                        "startup_s": startup,
                        "train_s": times[-1] - startup,
                        "wall_s": times[-1],
                    }
                )
    table = pd.DataFrame(rows)
    print(table.to_string(index=False, float_format="%.2f"))
    figures = {}
    for kind, trials in table.groupby("kind", sort=False):
        startup_s, train_s = float(trials["startup_s"].median()), float(trials["train_s"].median())
        figures[kind] = {
            "startup_s": round(startup_s, 2),
            "first_startup_s": round(float(trials["startup_s"].iloc[0]), 2),
            "train_s": round(train_s, 2),
            "startup_share": round(startup_s / (startup_s + train_s), 3),
        }
    print(
        json.dumps(
            {
                **figures,
                "trials": args.trials,
                "workers": args.workers,
                "epochs": args.epochs,
                "machine": "2-core CPU",
            }
        )
    )


if __name__ == "__main__":
    main()
