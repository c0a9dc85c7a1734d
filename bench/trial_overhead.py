"""How much of a trial is Ray's start-up (worker processes, imports, process group) and how much
is training, for a tiny model on the demo data.

    python bench/trial_overhead.py [--trials 2] [--epochs 3] [--workers 2]

Runs a real search with ray_jobs/tune.py (no early stopping) and splits each trial's wall time
using the per-epoch times it reported: start-up = time to the first epoch minus one epoch.
Prints a table, then one JSON line: startup_s, train_s (medians over trials), startup_share.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    import pandas as pd

    from searches import demo_space, run_search, small_demo_data

    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        space = demo_space(small_demo_data(folder), "overhead",
                           resources={"workers": args.workers, "cpus_per_worker": round(1.9 / args.workers, 2)},
                           search={"searcher": "random", "num_samples": args.trials, "max_concurrent": 1},
                           scheduler={"type": "none", "max_epochs": args.epochs})
        epochs = pd.read_parquet(run_search(space, folder) / "epochs.parquet")

    rows = []
    for trial_id, trial in epochs.sort_values("epoch").groupby("trial_id"):
        times = trial["time_total_s"].to_numpy()
        epoch_s = (times[-1] - times[0]) / max(len(times) - 1, 1)
        startup = times[0] - epoch_s
        rows.append({"trial_id": trial_id, "startup_s": startup, "train_s": times[-1] - startup,
                     "wall_s": times[-1]})
    table = pd.DataFrame(rows)
    print(table.to_string(index=False, float_format="%.1f"))
    startup_s, train_s = float(table["startup_s"].median()), float(table["train_s"].median())
    print(json.dumps({"startup_s": round(startup_s, 2), "train_s": round(train_s, 2),
                      "startup_share": round(startup_s / (startup_s + train_s), 3), "workers": args.workers,
                      "epochs": args.epochs, "machine": "2-core CPU"}))


if __name__ == "__main__":
    main()
