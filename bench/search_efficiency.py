"""ASHA + Optuna TPE against random search without early stopping: same trials, same data.

    python bench/search_efficiency.py [--trials 8] [--epochs 6]

Prints each search's trial-epochs and best val_acc, then one JSON line with epoch_fraction (the
trial-epochs ASHA + TPE spent until its best came within 1 point of random search's best, as a
fraction of random search's trial-epochs) and best_gap (random's best val_acc minus ASHA's).
Target: within 1 point of random search's best for at most 40% of its trial-epochs.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import pandas as pd

from searches import demo_space, run_search, small_demo_data

SEARCHED = {"lr": {"loguniform": [3.0e-4, 3.0e-2]}, "augment": {"choice": ["none", "light", "sketch"]},
            "label_smoothing": {"uniform": [0.0, 0.2]}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=6)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        data = small_demo_data(folder)
        common = dict(space=SEARCHED)
        asha = run_search(demo_space(data, "asha_tpe", **common,
                                     search={"searcher": "optuna", "num_samples": args.trials},
                                     scheduler={"type": "asha", "max_epochs": args.epochs, "grace_period": 1,
                                                "reduction_factor": 3}), folder)
        plain = run_search(demo_space(data, "random_full", **common,
                                      search={"searcher": "random", "num_samples": args.trials},
                                      scheduler={"type": "none", "max_epochs": args.epochs}), folder)
        asha_epochs = pd.read_parquet(asha / "epochs.parquet")
        random_epochs = pd.read_parquet(plain / "epochs.parquet")

    random_best = random_epochs["val_acc"].max()
    in_order = asha_epochs.sort_values("timestamp")
    running_best = in_order["val_acc"].cummax().to_numpy()
    within = (running_best >= random_best - 0.01).nonzero()[0]
    spent = int(within[0]) + 1 if len(within) else len(in_order)
    table = pd.DataFrame([
        {"search": "ASHA + TPE", "trial_epochs": len(asha_epochs), "best_val_acc": asha_epochs["val_acc"].max()},
        {"search": "random, no stopping", "trial_epochs": len(random_epochs), "best_val_acc": random_best},
    ])
    print(table.to_string(index=False, float_format="%.4f"))
    print(f"ASHA + TPE came within 1 point of random's best after {spent} trial-epochs"
          if len(within) else "ASHA + TPE never came within 1 point of random's best")
    print(json.dumps({"epoch_fraction": round(spent / len(random_epochs), 3),
                      "best_gap": round(float(random_best - asha_epochs["val_acc"].max()), 4),
                      "reached": bool(len(within)), "asha_trial_epochs": len(asha_epochs),
                      "random_trial_epochs": len(random_epochs), "trials": args.trials, "epochs": args.epochs,
                      "machine": "2-core CPU"}))


if __name__ == "__main__":
    main()
