"""Scoring, calibrating and weighting an ensemble on out-of-fold predictions (numpy and torch).

Every function takes class probabilities, shape (images, classes), rows in ``train.csv`` order for
out-of-fold ones, and the true targets.

- ``temperature``: the one temperature per model that minimises its out-of-fold log-loss
  (members trained with different label smoothing are not on one scale otherwise);
- ``greedy_weights``: Caruana et al.'s ensemble selection (ICML 2004): forward selection with
  replacement, starting from the best single member, keeping the best ensemble any round made,
  so it never scores worse on the out-of-fold data than that member;
- ``fold_estimate``: the accuracy over folds with its standard error: what to expect on new data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

METRICS = ("log_loss", "accuracy")
GREEDY_ROUNDS = 25  # members added, with replacement, in Caruana's forward selection
METHODS = ("mean", "greedy", "best")
_EPS = 1e-12  # log(0) guard


def accuracy(probs: np.ndarray, targets: np.ndarray) -> float:
    return float((probs.argmax(1) == targets).mean())


def log_loss(probs: np.ndarray, targets: np.ndarray) -> float:
    return float(-np.log(np.clip(probs[np.arange(len(targets)), targets], _EPS, 1.0)).mean())


def scores(probs: np.ndarray, targets: np.ndarray) -> dict[str, float]:
    return {"accuracy": accuracy(probs, targets), "log_loss": log_loss(probs, targets)}


def temperature(probs: np.ndarray, targets: np.ndarray) -> float:
    """The T > 0 for which ``calibrated(probs, T)`` has the lowest log-loss on these targets."""
    log_probs = torch.from_numpy(np.log(np.clip(probs, _EPS, 1.0))).double()
    truth = torch.from_numpy(np.asarray(targets)).long()
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)  # T = 1: the model as it is
    optimiser = torch.optim.LBFGS([log_t], lr=0.5, max_iter=100, line_search_fn="strong_wolfe")

    def closure():
        optimiser.zero_grad()
        loss = torch.nn.functional.cross_entropy(log_probs / log_t.exp(), truth)
        loss.backward()
        return loss

    optimiser.step(closure)
    return float(log_t.detach().exp())


def calibrated(probs: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(log p / T): the same ranking of classes, sharper (T < 1) or softer (T > 1)."""
    logits = np.log(np.clip(probs, _EPS, 1.0)) / temperature
    logits -= logits.max(1, keepdims=True)
    exp = np.exp(logits)
    return exp / exp.sum(1, keepdims=True)


def weighted(probs_by_model: dict[str, np.ndarray], weights: dict[str, float]) -> np.ndarray:
    """The weighted mean of the members' probabilities (weights summing to 1)."""
    return sum(weights[name] * probs_by_model[name] for name in weights if weights[name])


def greedy_weights(
    probs_by_model: dict[str, np.ndarray],
    targets: np.ndarray,
    *,
    metric: str = "log_loss",
    rounds: int = GREEDY_ROUNDS,
) -> dict[str, float]:
    """Each member's weight in the best ensemble forward selection with replacement finds on
    these (out-of-fold) predictions, by ``metric``; ties go to the member listed first."""
    if metric not in METRICS:
        raise ValueError(f"metric: expected one of {', '.join(METRICS)}, got {metric!r}")
    better = (lambda a, b: a < b) if metric == "log_loss" else (lambda a, b: a > b)
    score = log_loss if metric == "log_loss" else accuracy
    names = list(probs_by_model)
    counts = dict.fromkeys(names, 0)
    total = np.zeros_like(next(iter(probs_by_model.values())), dtype=np.float64)
    best_score, best_counts = None, None
    for size in range(1, rounds + 1):
        candidates = [
            (score((total + probs_by_model[name]) / size, targets), name) for name in names
        ]
        chosen_score, chosen = candidates[0]
        for candidate_score, name in candidates[1:]:
            if better(candidate_score, chosen_score):
                chosen_score, chosen = candidate_score, name
        counts[chosen] += 1
        total += probs_by_model[chosen]
        if best_score is None or better(chosen_score, best_score):
            best_score, best_counts = chosen_score, dict(counts)
    chosen_total = sum(best_counts.values())
    return {name: best_counts[name] / chosen_total for name in names}


def fold_estimate(
    probs: np.ndarray, targets: np.ndarray, fold_of_row: np.ndarray
) -> tuple[float, float]:
    """The mean over folds of the accuracy on each held-out fold, and its standard error."""
    per_fold = [
        accuracy(probs[fold_of_row == fold], targets[fold_of_row == fold])
        for fold in np.unique(fold_of_row)
    ]
    spread = float(np.std(per_fold, ddof=1)) if len(per_fold) > 1 else math.nan
    return float(np.mean(per_fold)), spread / math.sqrt(len(per_fold))


@dataclass(frozen=True)
class Ensemble:
    """How members' probabilities become the submission: a temperature each, then weights."""

    weights: dict[str, float]
    temperatures: dict[str, float]

    def __call__(self, probs_by_member: dict[str, np.ndarray]) -> np.ndarray:
        return weighted(
            {
                name: calibrated(probs, self.temperatures[name])
                for name, probs in probs_by_member.items()
            },
            self.weights,
        )


def equal_vote(members: list[str]) -> Ensemble:
    """Today's soft vote: every member alike, as it is."""
    return Ensemble(dict.fromkeys(members, 1.0 / len(members)), dict.fromkeys(members, 1.0))


def fit_ensemble(
    oof_by_member: dict[str, np.ndarray],
    targets: np.ndarray,
    *,
    method: str,
    calibrate: bool,
    metric: str = "log_loss",
) -> Ensemble:
    """An ensemble chosen on out-of-fold (or other held-out) predictions: ``method`` mean (equal
    weights), greedy (``greedy_weights`` by ``metric``) or best (the one best member by
    ``metric``), each member first calibrated by its own temperature when ``calibrate``."""
    temperatures = {
        name: temperature(probs, targets) if calibrate else 1.0
        for name, probs in oof_by_member.items()
    }
    if method == "mean":
        return Ensemble(equal_vote(list(oof_by_member)).weights, temperatures)
    calibrated_oof = {
        name: calibrated(probs, temperatures[name]) for name, probs in oof_by_member.items()
    }
    rounds = {"greedy": GREEDY_ROUNDS, "best": 1}[method]
    return Ensemble(
        greedy_weights(calibrated_oof, targets, metric=metric, rounds=rounds), temperatures
    )


def halves(targets: np.ndarray, seed: int = 0) -> np.ndarray:
    """Each image's half, 0 or 1: a seeded split of every class's images into two halves of
    (nearly) equal size."""
    rng = np.random.default_rng(seed)
    half = np.zeros(len(targets), dtype=np.int64)
    for target in np.unique(targets):
        shuffled = rng.permutation(np.flatnonzero(targets == target))
        half[shuffled] = np.arange(len(shuffled)) % 2
    return half


def selected_on_halves(
    probs_by_member: dict[str, np.ndarray],
    targets: np.ndarray,
    *,
    half: np.ndarray,
    method: str,
    calibrate: bool,
    metric: str = "log_loss",
) -> dict[str, Any]:
    """What the ensemble ``fit_ensemble`` chooses scores on images it was not chosen on: it is
    chosen on one half of the images (``half``) and scored on the other, and the other way round;
    the two scores are averaged. The same for the single best member, chosen on one half by
    ``metric`` and scored on the other: what the ensemble adds to picking one model."""
    rounds = []
    for chosen_on in (0, 1):
        pick, score = half == chosen_on, half != chosen_on
        chosen = {name: probs[pick] for name, probs in probs_by_member.items()}
        scored = {name: probs[score] for name, probs in probs_by_member.items()}
        round_ = {}
        for kind, how in (("ensemble", method), ("single", "best")):
            ensemble = fit_ensemble(
                chosen, targets[pick], method=how, calibrate=calibrate, metric=metric
            )
            round_[kind] = {**scores(ensemble(scored), targets[score]), "weights": ensemble.weights}
        rounds.append(round_)
    return {
        "images": len(targets),
        **{
            kind: {name: float(np.mean([r[kind][name] for r in rounds])) for name in METRICS}
            for kind in ("ensemble", "single")
        },
        "halves": rounds,
    }
