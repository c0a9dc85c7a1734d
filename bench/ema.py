"""Does an exponential moving average of the weights help a short fine-tune of a pretrained
backbone? EMA and no EMA side by side on held-out real sketches (bench/README.md).

    python bench/ema.py --quickdraw PATH [--seeds 0 1] [--epochs 8] [--decays 0.99 0.998]

The transfer problem of bench/search_vs_default.py (60 Quick, Draw! classes x 40 training and 40
test drawings at 64 px, resnet18 pretrained on the other 285 classes by the product's own trainer).
Per seed, the default configuration (TrainConfig's defaults on that model) is fine-tuned with
``python -m sketch_core.train`` on 80% of the training drawings, once without EMA and once with
EMA per decay (timm's warm-up on, the average validated and predicting: the defaults of ``ema``).
The same seed, split, schedule and test-time augmentation in every arm.

Prints, per arm, the validation accuracy of what the run keeps (and, with EMA, of the raw
weights beside it) and the test accuracy against test_answers.csv; then medians and ranges over
seeds. The last line is one JSON object with the figures. (8 epochs are 480 optimiser steps: 1,920
drawings in batches of 32; an EMA's time constant is 1/(1 - decay) steps.)
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from search_vs_default import default_options, problem
from searches import (
    add_problem_options,
    prepare_work,
    print_table,
    run_command,
    spread,
    spread_text,
    test_accuracy,
)

VAL_FRACTION = 0.2


def fine_tune(setup: dict, out: Path, *, seed: int, epochs: int, decay: float | None) -> dict:
    """One fine-tune of the default, with EMA at ``decay`` (None: without); its last epoch's
    metrics and its submission's test accuracy."""
    ema = ["--ema", "true", "--ema-decay", decay] if decay else ["--ema", "false"]
    options = default_options(setup, seed=seed)
    fraction = options.index("--val-fraction") + 1
    options[fraction] = VAL_FRACTION
    run_command(
        ["-m", "sketch_core.train", *options, *ema, "--epochs", epochs, "--out", out, "--predict"]
    )
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    return {
        "val_acc": last["val_acc"],
        "val_acc_raw": last.get("val_acc_raw"),
        "test_acc": test_accuracy(out / "submission.csv", setup["data_dir"]),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--decays", type=float, nargs="+", default=[0.99, 0.998])
    add_problem_options(parser)
    args = parser.parse_args(argv)
    prepare_work(args)
    setup = problem("transfer", args)
    arms = {"no EMA": None, **{f"EMA {decay:g}": decay for decay in args.decays}}
    runs: dict[str, list[dict]] = {arm: [] for arm in arms}
    with tempfile.TemporaryDirectory(prefix="bench-ema-") as tmp:
        for seed in args.seeds:
            for arm, decay in arms.items():
                out = Path(tmp) / f"{arm.replace(' ', '-')}-{seed}"
                runs[arm].append(fine_tune(setup, out, seed=seed, epochs=args.epochs, decay=decay))
                print(f"seed {seed}, {arm}: {json.dumps(runs[arm][-1])}", flush=True)

    def summary(arm: str, key: str) -> str:
        return spread_text(spread([run[key] for run in runs[arm]]))

    print(
        f"\nresnet18 fine-tuned {args.epochs} epochs from its Quick, Draw! pretraining, "
        f"seeds {args.seeds}: median (min..max)"
    )
    print_table(
        ("arm", "val acc (kept)", "val acc (raw)", "test acc"),
        [
            (
                arm,
                summary(arm, "val_acc"),
                summary(arm, "val_acc_raw") if arms[arm] else "-",
                summary(arm, "test_acc"),
            )
            for arm in arms
        ],
    )
    print(
        json.dumps(
            {
                "epochs": args.epochs,
                "seeds": args.seeds,
                "runs": runs,
                "test_acc_median": {
                    arm: spread([run["test_acc"] for run in runs[arm]])["median"] for arm in arms
                },
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
