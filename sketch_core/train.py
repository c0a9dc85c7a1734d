"""Train one configuration without Ray, for debugging a config on a laptop.

    python -m sketch_core.train --data-dir data/demo --model test_vit --image-size 64 --epochs 3 \\
        --out runs/debug

Every ``TrainConfig`` field is an option (``--lr 3e-4``, ``--freeze head``, ...). Each epoch's
metrics are printed as JSON and appended to ``OUT/metrics.jsonl``; ``OUT/last.pt`` is the latest
checkpoint, which ``--resume`` continues from. ``--predict`` writes a submission for test.csv and
its class probabilities (probs.npy, rows in test.csv order).
At the end ``OUT/backbone.safetensors`` holds the trained backbone alone (timm's names, no head):
what a search's ``model.checkpoint_file`` loads as pretrained weights.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from sketch_core.config import TTA, TrainConfig
from sketch_core.errors import SketchError


def config_options(parser: argparse.ArgumentParser) -> None:
    """One ``--field-name`` option per TrainConfig field, parsed as text and typed by
    ``from_dict``."""
    group = parser.add_argument_group("training configuration (TrainConfig)")
    for field in dataclasses.fields(TrainConfig):
        default = field.default
        help_text = field.metadata.get("help", "") if field.metadata else ""
        choices = field.metadata.get("choices") if field.metadata else None
        group.add_argument(
            f"--{field.name.replace('_', '-')}",
            dest=field.name,
            default=None,
            choices=choices,
            metavar=None if choices else field.name.upper(),
            help=f"{help_text + '; ' if help_text else ''}default {default!r}",
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sketch_core.train",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--out", default="runs/debug", help="folder for metrics.jsonl, last.pt, submissions"
    )
    parser.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    parser.add_argument(
        "--predict", action="store_true", help="after training, write OUT/submission.csv"
    )
    parser.add_argument(
        "--tta",
        action=argparse.BooleanOptionalAction,
        default=TTA,
        help="--predict: average the prediction of each image and its horizontal flip "
        "(as final_fit.py does by default)",
    )
    config_options(parser)
    args = parser.parse_args(argv)
    try:
        run(args)
    except SketchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # last.pt holds the last finished epoch
        print(
            f"interrupted; continue with the same options and --resume (--out {args.out})",
            file=sys.stderr,
        )
        return 130
    return 0


def run(args: argparse.Namespace) -> None:
    values = {
        name: getattr(args, name)
        for name in TrainConfig.field_names()
        if getattr(args, name) is not None
    }
    config = TrainConfig.from_dict(values, source="command line")
    from sketch_core.models import check_model_name  # imports timm: after the cheap checks

    check_model_name(config.model, "command line")
    # torch and timm take seconds to import: after --help and the option checks, not before.
    from sketch_core.engine import TrainingRun, load_checkpoint, save_backbone, save_checkpoint

    out = Path(args.out)
    checkpoint = out / "last.pt"
    state = load_checkpoint(checkpoint) if args.resume else None
    if state is None and checkpoint.exists():
        raise SketchError(
            f"{checkpoint}: a run is already there; "
            "pass --resume to continue it or choose another --out"
        )
    training = TrainingRun(config, state=state)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "metrics.jsonl", "a") as log:
        for metrics in training.epochs():
            save_checkpoint(training.state_dict(), checkpoint)
            print(json.dumps(metrics), flush=True)
            log.write(json.dumps(metrics) + "\n")
    print(f"wrote {save_backbone(training, out / 'backbone.safetensors')}")
    if args.predict:
        predict_test(training, out, tta=args.tta)


def predict_test(training, out: Path, *, tta: bool) -> None:
    from sketch_core.data import read_test_table
    from sketch_core.io import atomic_write, save_npy, unused_path
    from sketch_core.predict import write_submission

    test = read_test_table(training.config.data_dir)
    probs = training.predict(test.paths, tta=tta)
    path = write_submission(unused_path(str(out / "submission.csv")), test.frame, probs)
    probs_path = atomic_write(
        unused_path(str(out / "probs.npy")), lambda part: save_npy(part, probs)
    )
    print(f"wrote {path} and its class probabilities {probs_path}")


if __name__ == "__main__":
    sys.exit(main())
