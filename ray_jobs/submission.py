"""How the predictions of final_fit.py's models become the submitted ensemble, with the estimate
of its accuracy that each way of choosing it allows (driver side: numpy only, after the fits).

- refits on all data: an equal soft vote of the configurations, no estimate (nothing held out);
- refits on K folds: each fold model predicts the fold it left out, so every configuration has
  out-of-fold predictions of every training image; the ensemble is chosen on them (mean or
  Caruana's greedy selection) and the estimate is its accuracy over folds;
- the search's own models (``--from-trials``): each predicts the validation images of the one
  split the search shared; Caruana's greedy selection chooses members and weights on them, and
  the estimate is what the same selection, made on one half of those images, scores on the other
  half (both ways round), beside the single best model chosen the same way.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np

from ray_jobs.refit import ModelSpec, load_npy, out_of_fold
from ray_jobs.results import ResultsStore
from sketch_core import ensemble as ens
from sketch_core.errors import SketchError


def test_predictions(store: ResultsStore, folder: str, specs: list[ModelSpec]) -> dict[str, Any]:
    """Each model's test probabilities, and each member's (its folds vote alike)."""
    models = {
        s.model_id: load_npy(store.read_bytes(f"{folder}/probs-{s.model_id}.npy")) for s in specs
    }
    members = {
        member: np.mean([models[s.model_id] for s in specs if s.member == member], axis=0)
        for member in dict.fromkeys(s.member for s in specs)
    }
    return {"models": models, "members": members}


def validation_predictions(
    store: ResultsStore, folder: str, specs: list[ModelSpec]
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The rows of train.csv the trials validated on, and each trial model's probabilities for
    them; refused unless every model validated on the same images."""
    rows, probs = None, {}
    for spec in specs:
        with np.load(
            io.BytesIO(store.read_bytes(f"{folder}/heldout-{spec.model_id}.npz"))
        ) as saved:
            if rows is not None and not np.array_equal(rows, saved["rows"]):
                raise SketchError(
                    f"{store.uri(folder)}: trial {spec.source_trial} validated on other images "
                    "than the trials before it; their predictions cannot be compared image by image"
                )
            rows, probs[spec.member] = saved["rows"], saved["probs"]
    return rows, probs


def from_trials(
    probs: dict[str, np.ndarray], targets: np.ndarray, *, calibrate: bool, select_by: str, seed: int
) -> tuple[ens.Ensemble, dict[str, Any]]:
    """The ensemble greedy selection chooses on all the validation images, and the summary of what
    it scores where it was not chosen (``ensemble.selected_on_halves``)."""
    choose = dict(method="greedy", calibrate=calibrate, metric=select_by)
    estimate = ens.selected_on_halves(probs, targets, half=ens.halves(targets, seed), **choose)
    combined = ens.fit_ensemble(probs, targets, **choose)
    members = {name: ens.scores(member, targets) for name, member in probs.items()}
    return combined, {
        "images": len(targets),
        "select_by": select_by,
        "members": {
            name: {
                **members[name],
                "weight": combined.weights[name],
                "temperature": combined.temperatures[name],
            }
            for name in probs
        },
        "estimate": estimate,
    }


def print_from_trials(summary: dict[str, Any]) -> None:
    print(f"the search's models on its {summary['images']} validation images:")
    for name, row in summary["members"].items():
        print(
            f"  {name:16s} accuracy {row['accuracy']:.4f}  log-loss {row['log_loss']:.4f}  "
            f"weight {row['weight']:.3g}"
        )
    estimate = summary["estimate"]
    print(
        f"greedy selection by {summary['select_by']}, chosen on one half of these images and "
        f"scored on the other (both ways): accuracy {estimate['ensemble']['accuracy']:.4f} "
        f"(the single best model chosen so: {estimate['single']['accuracy']:.4f}). Expect about "
        "this on new data; the submission's weights are chosen on all of them"
    )


def from_folds(
    store: ResultsStore,
    folder: str,
    specs: list[ModelSpec],
    targets: np.ndarray,
    *,
    method: str,
    calibrate: bool,
    select_by: str,
    search_best: float,
) -> tuple[ens.Ensemble, dict[str, Any], dict[str, np.ndarray]]:
    """The ensemble chosen on the fold models' out-of-fold predictions, its summary (fit.json's
    ``out_of_fold``) and each member's out-of-fold probabilities."""
    oof = out_of_fold(store, folder, specs, len(targets))
    combined = ens.fit_ensemble(
        {m: probs for m, (probs, _) in oof.items()},
        targets,
        method=method,
        calibrate=calibrate,
        metric=select_by,
    )
    summary = out_of_fold_summary(
        oof, combined, targets, method=method, select_by=select_by, search_best=search_best
    )
    return combined, summary, {member: probs for member, (probs, _) in oof.items()}


def out_of_fold_summary(
    oof: dict, combined, targets, *, method: str, select_by: str, search_best: float
) -> dict:
    """fit.json's ``out_of_fold``: each configuration's out-of-fold scores (per fold, pooled,
    before and after its temperature), the ensemble's, and the cross-validated estimate of the
    submitted ensemble's accuracy with its standard error over folds."""
    members = {}
    for member, (probs, fold_of_row) in oof.items():
        fixed = ens.calibrated(probs, combined.temperatures[member])
        members[member] = {
            **ens.scores(probs, targets),
            "log_loss_calibrated": ens.scores(fixed, targets)["log_loss"],
            "temperature": combined.temperatures[member],
            "weight": combined.weights[member],
            "fold_accuracy": [
                ens.scores(probs[fold_of_row == k], targets[fold_of_row == k])["accuracy"]
                for k in np.unique(fold_of_row)
            ],
        }
    fold_of_row = next(iter(oof.values()))[1]
    ensemble = combined({member: probs for member, (probs, _) in oof.items()})
    accuracy, error = ens.fold_estimate(ensemble, targets, fold_of_row)
    return {
        "images": len(targets),
        "folds": int(fold_of_row.max()) + 1,
        "members": members,
        "ensemble": {
            "method": method,
            **({"select_by": select_by} if method == "greedy" else {}),
            **ens.scores(ensemble, targets),
        },
        "estimate": {
            "accuracy": accuracy,
            "standard_error": error,
            "search_best_val_acc": search_best,
        },
    }


def print_out_of_fold(summary: dict) -> None:
    print(
        f"out-of-fold predictions of {summary['images']} training images, {summary['folds']} folds:"
    )
    for member, row in summary["members"].items():
        print(
            f"  {member:9s} accuracy {row['accuracy']:.4f}  log-loss {row['log_loss']:.4f} -> "
            f"{row['log_loss_calibrated']:.4f} at temperature {row['temperature']:.3g}  "
            f"weight {row['weight']:.3g}"
        )
    ensemble = summary["ensemble"]
    how = ensemble["method"] + (f" by {ensemble['select_by']}" if "select_by" in ensemble else "")
    print(
        f"  {'ensemble':9s} accuracy {ensemble['accuracy']:.4f}  "
        f"log-loss {ensemble['log_loss']:.4f} ({how})"
    )
    estimate = summary["estimate"]
    print(
        f"cross-validated accuracy of the submitted ensemble: {estimate['accuracy']:.4f} "
        f"± {estimate['standard_error']:.4f} (standard error over {summary['folds']} folds). "
        "Expect this on new data, not the search's best val_acc "
        f"({estimate['search_best_val_acc']:.4f}: the best of many trials on one split)"
    )


def scores_against_answers(data_dir: str, test_frame, probs_by_model: dict) -> dict[str, float]:
    """Accuracy of each model and the ensemble where the answers are known (the demo data set)."""
    from sketch_core.demo_data import known_answers

    truth = known_answers(data_dir, test_frame["image_path"])
    if truth is None:
        return {}
    return {
        name: float((probs.argmax(1) == truth).mean()) for name, probs in probs_by_model.items()
    }
