"""sketch_core.ensemble on predictions whose qualities are known by construction."""

import math

import numpy as np
import pytest

from sketch_core.ensemble import (
    accuracy,
    calibrated,
    fold_estimate,
    greedy_weights,
    log_loss,
    scores,
    temperature,
    weighted,
)

CLASSES, IMAGES = 5, 600


def predictions(seed: int, *, skill: float, sharpness: float) -> tuple[np.ndarray, np.ndarray]:
    """Softmax of noisy logits that favour the true class by ``skill``, scaled by ``sharpness``."""
    rng = np.random.default_rng(seed)
    targets = np.random.default_rng(0).integers(0, CLASSES, IMAGES)
    logits = rng.normal(size=(IMAGES, CLASSES))
    logits[np.arange(IMAGES), targets] += skill
    logits *= sharpness
    exp = np.exp(logits - logits.max(1, keepdims=True))
    return exp / exp.sum(1, keepdims=True), targets


@pytest.mark.parametrize("sharpness, direction", [(4.0, "softer"), (0.3, "sharper")])
def test_temperature_undoes_over_and_under_confidence(sharpness, direction):
    probs, targets = predictions(1, skill=1.5, sharpness=sharpness)
    t = temperature(probs, targets)
    assert (t > 1.5) if direction == "softer" else (t < 0.7), t
    fixed = calibrated(probs, t)
    assert log_loss(fixed, targets) < log_loss(probs, targets) - 0.05
    assert accuracy(fixed, targets) == accuracy(
        probs, targets
    )  # a temperature never changes the argmax
    assert np.allclose(fixed.sum(1), 1.0)
    # the minimum: a little off in either direction is worse
    assert log_loss(fixed, targets) <= min(
        log_loss(calibrated(probs, t * f), targets) for f in (0.9, 1.1)
    )


@pytest.mark.parametrize("skill, sharpness", [(1.5, 1.0), (1.5, 4.0), (2.5, 0.5)])
def test_temperature_finds_the_bayes_calibration(skill, sharpness):
    """Unit Gaussian noise with the true class shifted by ``skill``: the posterior is
    softmax(skill x logits), so the right temperature for logits scaled by ``sharpness`` is
    sharpness / skill."""
    probs, targets = predictions(2, skill=skill, sharpness=sharpness)
    assert temperature(probs, targets) == pytest.approx(sharpness / skill, rel=0.15)


def test_greedy_selection_never_loses_to_the_best_member_and_ignores_a_useless_one():
    good, targets = predictions(3, skill=2.0, sharpness=1.0)
    other, _ = predictions(
        4, skill=2.0, sharpness=1.0
    )  # as good, independent errors: worth averaging
    useless = np.full_like(good, 1.0 / CLASSES)
    members = {"useless": useless, "good": good, "other": other}
    for metric in ("log_loss", "accuracy"):
        weights = greedy_weights(members, targets, metric=metric)
        assert sum(weights.values()) == pytest.approx(1.0)
        ensemble = weighted(members, weights)
        best_single = (
            max(accuracy(p, targets) for p in members.values())
            if metric == "accuracy"
            else min(log_loss(p, targets) for p in members.values())
        )
        score = accuracy(ensemble, targets) if metric == "accuracy" else log_loss(ensemble, targets)
        assert (score >= best_single) if metric == "accuracy" else (score <= best_single), (
            metric,
            weights,
        )
    weights = greedy_weights(members, targets)
    assert weights["useless"] == 0 and weights["good"] > 0 and weights["other"] > 0
    assert log_loss(weighted(members, weights), targets) < min(
        log_loss(good, targets), log_loss(other, targets)
    )
    with pytest.raises(ValueError, match="metric: expected one of log_loss, accuracy"):
        greedy_weights(members, targets, metric="auc")


def test_one_member_gets_all_the_weight():
    probs, targets = predictions(5, skill=1.0, sharpness=1.0)
    assert greedy_weights({"only": probs}, targets) == {"only": 1.0}


def test_the_fold_estimate_is_the_mean_over_folds_with_its_standard_error():
    targets = np.array([0, 1, 0, 1, 0, 1, 0, 1])
    probs = np.eye(2)[[0, 1, 0, 1, 1, 0, 0, 1]]  # fold 0 all right, fold 1 half right
    folds = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    mean, error = fold_estimate(probs, targets, folds)
    assert mean == pytest.approx(0.75)
    assert error == pytest.approx(np.std([1.0, 0.5], ddof=1) / math.sqrt(2))
    assert scores(probs, targets)["accuracy"] == pytest.approx(0.75)


def test_the_trial_ensemble_is_chosen_on_one_half_of_the_images_and_scored_on_the_other():
    """A member that is right on one half of the validation images only (as a model that saw
    them would be) wins any selection made on that half; the estimate scores each selection on
    the half it did not see, so the member's luck does not reach the estimate."""
    from sketch_core.ensemble import fit_ensemble, halves, selected_on_halves

    honest, targets = predictions(1, skill=1.0, sharpness=1.0)
    half = halves(targets, seed=0)
    assert abs((half == 0).mean() - 0.5) < 0.01
    for target in range(CLASSES):  # every class split in two
        assert abs((half[targets == target] == 0).mean() - 0.5) < 0.02
    lucky = np.full_like(honest, 1 / CLASSES)
    lucky[half == 0] = np.eye(CLASSES)[targets[half == 0]] * 0.98 + 0.004
    members = {"honest": honest, "lucky": lucky}
    estimate = selected_on_halves(
        members, targets, half=half, method="greedy", calibrate=False, metric="accuracy"
    )
    first, second = estimate["halves"]
    assert first["ensemble"]["weights"]["lucky"] > 0.5  # chosen on half 0, where it is right
    chosen = fit_ensemble(
        {n: p[half == 0] for n, p in members.items()},
        targets[half == 0],
        method="greedy",
        calibrate=False,
        metric="accuracy",
    )
    on_other_half = {n: p[half == 1] for n, p in members.items()}
    assert first["ensemble"]["accuracy"] == accuracy(chosen(on_other_half), targets[half == 1])
    assert second["ensemble"]["weights"]["honest"] == 1.0  # lucky is no better than chance there
    assert estimate["ensemble"]["accuracy"] == pytest.approx(
        (first["ensemble"]["accuracy"] + second["ensemble"]["accuracy"]) / 2
    )
    # Scored where it was chosen, the ensemble would look near perfect: the estimate does not.
    assert (
        accuracy(chosen({n: p[half == 0] for n, p in members.items()}), targets[half == 0]) > 0.95
    )
    assert estimate["ensemble"]["accuracy"] < 0.75 and estimate["single"]["accuracy"] < 0.75
