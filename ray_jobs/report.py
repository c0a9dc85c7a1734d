"""Plots and a summary of one search: results/<experiment>/report/.

    python ray_jobs/report.py                     # the latest experiment under results/
    python ray_jobs/report.py --name eva02_large_448 --results s3://BUCKET/sketch-hpo

Writes report/: summary.md (best trial, top trials, status counts, errors, time and cost,
hyperparameter importance; after final_fit.py --folds, the members and the ensemble out of fold) and
the PNGs it embeds: learning curves, each searched hyperparameter against the metric, parallel
coordinates, importance, cost, and the submitted ensemble's reliability diagram. Safe to run while
the search goes on: it reports what the tables hold so far. tune.py runs it after every search.
"""

from __future__ import annotations

import argparse
import io
import sys
import warnings
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import optuna
import pandas as pd
from matplotlib import pyplot as plt
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from optuna.visualization.matplotlib import (
    plot_parallel_coordinate,
    plot_param_importances,
    plot_slice,
)

from ray_jobs.cli import run_cli
from ray_jobs.results import (
    BEST_KEYS,
    ENDED_STATUSES,
    TRIAL_COLUMNS,
    ResultsStore,
    latest_experiment,
    plain,
    ranked,
    read_search,
    within_noise,
)

REPORT_FOLDER = "report"
TOP_TRIALS = 10
CURVE_STYLES = {
    "finished": dict(linestyle="-", linewidth=1.2, alpha=0.9),
    "stopped_early": dict(color="0.6", linestyle="--", linewidth=1.0, alpha=0.8),
    "stopped_by_budget": dict(color="tab:orange", linestyle="--", linewidth=1.0, alpha=0.8),
    "error": dict(color="tab:red", linestyle=":", linewidth=1.2, marker="x", markevery=[-1]),
}
UNFINISHED_STYLE = dict(linestyle="-.", linewidth=1.0, alpha=0.9)  # running, pending, paused
BEST_STYLE = dict(color="black", linestyle="-", linewidth=2.5, zorder=5)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python ray_jobs/report.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--name", help="experiment (default: the latest under --results)")
    parser.add_argument(
        "--results", default="results", help="results root: a path, NFS path or s3://, gs:// URI"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_cli(
        lambda: print(f"report: {write_report(open_store(args.results, args.name))}"),
        after_interrupt="run report.py again",
    )


def open_store(results: str, name: str | None) -> ResultsStore:
    store = ResultsStore(results, name or latest_experiment(results))
    read_search(store)  # one error line now if it is missing or damaged
    return store


@dataclass
class SearchResults:
    """What the report reads of an experiment; the tables may be partial while the search runs."""

    experiment: str
    search: dict[str, Any]
    trials: pd.DataFrame
    epochs: pd.DataFrame
    best: dict[str, Any] | None
    refit: FoldRefit | None = None

    @property
    def metric(self) -> str:
        return self.search["metric"]

    @property
    def maximize(self) -> bool:
        return self.search["mode"] == "max"

    @property
    def score(self) -> str:
        """The trials.parquet column of each trial's best metric."""
        return f"best_{self.metric}"

    @cached_property
    def params(self) -> list[str]:
        """The searched hyperparameters that some trial drew (a branch may leave one inactive in
        all)."""
        return [
            name
            for name in self.search["searched"]
            if f"config.{name}" in self.trials and self.trials[f"config.{name}"].notna().any()
        ]

    def scale(self, name: str) -> str:
        return axis_scale(self.search["params"][name]["branches"])

    @cached_property
    def scored(self) -> pd.DataFrame:
        """Trials that reported the metric, best first."""
        return ranked(self.trials, metric=self.metric, mode=self.search["mode"])

    @property
    def best_trial_id(self) -> str | None:
        return self.best["trial_id"] if self.best else None


@dataclass
class FoldRefit:
    """The latest refit on folds (final_fit.py --folds): its fit.json, and the submitted ensemble's
    out-of-fold probabilities with the training targets."""

    folder: str
    fit: dict[str, Any]
    probs: np.ndarray
    targets: np.ndarray


def latest_fold_refit(store: ResultsStore) -> FoldRefit | None:
    from ray_jobs.refit import load_npy
    from sketch_core.data import read_train_table

    for name in reversed(store.list_names("final")):
        folder = f"final/{name}"
        if (
            name.startswith("fit-")
            and store.exists(f"{folder}/fit.json")
            and store.exists(f"{folder}/oof-ensemble.npy")
        ):
            fit = store.read_json(f"{folder}/fit.json")
            if fit.get("out_of_fold"):
                return FoldRefit(
                    folder,
                    fit,
                    load_npy(store.read_bytes(f"{folder}/oof-ensemble.npy")),
                    read_train_table(fit["data_dir"]).targets,
                )
    return None


def load_results(store: ResultsStore) -> SearchResults:
    search = read_search(store)
    metric = search["metric"]
    trials = (
        store.read_parquet("trials.parquet")
        if store.exists("trials.parquet")
        else pd.DataFrame(columns=list(TRIAL_COLUMNS))
    )
    if f"best_{metric}" not in trials:
        trials[f"best_{metric}"] = np.nan
    epochs = (
        store.read_parquet("epochs.parquet")
        if store.exists("epochs.parquet")
        else pd.DataFrame(columns=["trial_id", "epoch", metric])
    )
    best = store.read_json("best.json", required=BEST_KEYS) if store.exists("best.json") else None
    return SearchResults(store.experiment, search, trials, epochs, best, latest_fold_refit(store))


def write_report(store: ResultsStore) -> str:
    """Write ``report/`` of the experiment in ``store``; returns the report folder's URI."""
    results = load_results(store)
    importance = param_importance(results)
    cost = search_cost(results) if len(results.trials) else None
    figures = report_figures(results, importance, cost)
    for name, figure in figures.items():
        store.write_bytes(f"{REPORT_FOLDER}/{name}", png_bytes(figure))
    # Last, so that every image summary.md links to is there once it is.
    summary = summary_markdown(results, importance, cost, list(figures))
    store.write_bytes(f"{REPORT_FOLDER}/summary.md", summary.encode())
    return store.uri(REPORT_FOLDER)


def report_figures(
    results: SearchResults, importance: Importance, cost: SearchCost | None
) -> dict[str, Figure]:
    """The report's figures by file name; a figure with nothing to show is left out.

    Optuna draws what it can from a study of the trials (``trials_study``): each hyperparameter
    against the metric (slices), parallel coordinates (an inactive parameter on its own "missing"
    tick) and fANOVA importance. Drawn here: the learning curves (how each trial ended: ASHA's
    stops dashed, the best trial in black), the cost (the epochs ASHA saved) and the refit's
    reliability diagram, which Optuna has no plot for."""
    figures = {}
    if len(results.epochs):
        figures["learning_curves.png"] = learning_curves_figure(results)
    drawn = [name for name in results.params if results.scored[f"config.{name}"].notna().any()]
    if drawn:
        study = trials_study(
            results.scored,
            {name: results.scale(name) for name in drawn},
            results.score,
            results.maximize,
        )
        figures.update(
            {
                param_file(name): optuna_figure(
                    plot_slice, study, params=[name], target_name=f"best {results.metric}"
                )
                for name in drawn
            }
        )
        figures["parallel_coordinates.png"] = optuna_figure(
            plot_parallel_coordinate, study, params=drawn, target_name=f"best {results.metric}"
        )
    if importance.values:
        figures["importance.png"] = optuna_figure(
            plot_param_importances,
            importance.study,
            evaluator=importance.evaluator,
            target_name=f"best {results.metric}",
        )
    if cost:
        figures["cost.png"] = cost_figure(results, cost)
    if results.refit:
        figures["reliability.png"] = reliability_figure(results.refit)
    return figures


def optuna_figure(plot, study: optuna.Study, **options) -> Figure:
    """The figure of one of Optuna's matplotlib plots (an experimental API: its warning is
    muted)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        axes = plot(study, **options)
    figure = np.ravel(axes)[0].figure
    plt.close(figure)  # Optuna draws through pyplot: let go of its reference, the figure lives on
    return figure


def param_file(name: str) -> str:
    return f"param-{name}.png"


def new_figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def png_bytes(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return buffer.getvalue()


def axis_scale(branches: list[dict[str, Any]]) -> str:
    """How to lay out a parameter that was drawn from these branches (search.json's ``params``):
    ``categories`` for lists of values, ``log`` where a branch draws on a log scale, else
    ``linear``."""
    kinds = {branch["kind"] for branch in branches}
    if kinds <= {"choice", "grid"}:
        return "categories"
    return "log" if any("log" in kind for kind in kinds) else "linear"


# Learning curves ---------------------------------------------------------------------------------


def learning_curves_figure(results: SearchResults) -> Figure:
    figure = new_figure(9, 5.5)
    axes = figure.subplots()
    status_of = results.trials.set_index("trial_id")["status"].to_dict()
    drawn = set()
    for trial_id, epochs in results.epochs.dropna(subset=[results.metric]).groupby(
        "trial_id", sort=True
    ):
        status = status_of.get(trial_id, "")
        axes.plot(
            epochs["epoch"],
            epochs[results.metric],
            **(BEST_STYLE if trial_id == results.best_trial_id else curve_style(status)),
        )
        drawn.add(status)
    if results.best:
        axes.plot(
            [results.best["epoch"]],
            [results.best[results.metric]],
            marker="*",
            markersize=16,
            color="gold",
            markeredgecolor="black",
            zorder=6,
            linestyle="none",
        )
    axes.legend(handles=curve_legend(results, drawn), loc="best", fontsize="small")
    axes.set(
        xlabel="epoch",
        ylabel=results.metric,
        title=f"{results.experiment}: {results.metric} per epoch",
    )
    axes.grid(alpha=0.3)
    return figure


def curve_style(status: str) -> dict[str, Any]:
    return CURVE_STYLES.get(status, UNFINISHED_STYLE)


def curve_legend(results: SearchResults, statuses: set[str]) -> list[Line2D]:
    handles = [
        Line2D([], [], label=status, **{"color": "tab:blue", **curve_style(status)})
        for status in sorted(statuses)
        if status
    ]
    if results.best:
        handles.append(
            Line2D(
                [],
                [],
                marker="*",
                markersize=12,
                markerfacecolor="gold",
                markeredgecolor="black",
                label=f"best: {results.best_trial_id}",
                **BEST_STYLE,
            )
        )
    return handles


# Importance --------------------------------------------------------------------------------------


@dataclass
class Importance:
    values: dict[str, float]  # empty when skipped
    note: str
    study: optuna.Study | None = None  # the trials the values were computed on
    evaluator: optuna.importance.FanovaImportanceEvaluator | None = None


def param_importance(results: SearchResults) -> Importance:
    """fANOVA importance of the searched hyperparameters over the trials that ended with a score.

    Trials stopped early by ASHA count: they are most of a search, and leaving out the weak
    configurations would hide what made them weak.
    """
    ended = results.scored[results.scored["status"].isin(ENDED_STATUSES)]
    if len(ended) < 2:
        return Importance(
            {}, f"skipped: {len(ended)} trial(s) ended with a {results.metric}; at least 2 needed."
        )
    varying = [name for name in results.params if ended[f"config.{name}"].nunique() > 1]
    constant = [name for name in results.params if name not in varying]
    constant_note = (
        f" Constant over these trials, so left out: {', '.join(constant)}." if constant else ""
    )
    if len(varying) < 2:
        return Importance(
            {},
            f"skipped: {len(varying)} searched hyperparameter(s) varied "
            f"({', '.join(varying) or 'none'}); at least 2 needed.{constant_note}",
        )
    if ended[results.score].nunique() < 2:
        return Importance(
            {}, f"skipped: every trial scored the same {results.metric}.{constant_note}"
        )
    study = trials_study(
        ended, {name: results.scale(name) for name in varying}, results.score, results.maximize
    )
    evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
    values = optuna.importance.get_param_importances(study, evaluator=evaluator)
    return Importance(
        values,
        f"fANOVA (Optuna, seed 0) over {len(ended)} finished or early-stopped trials."
        f"{constant_note}",
        study,
        evaluator,
    )


def trials_study(
    trials: pd.DataFrame, params: dict[str, str], score: str, maximize: bool
) -> optuna.Study:
    """An in-memory Optuna study holding the trials, each with its best metric as its value:
    ``params`` maps each parameter to its ``axis_scale``; a trial holds the parameters it drew."""
    distributions = {
        name: observed_distribution(trials[f"config.{name}"].dropna(), scale)
        for name, scale in params.items()
    }
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # not "A new study created in memory"
    try:
        study = optuna.create_study(direction="maximize" if maximize else "minimize")
    finally:
        optuna.logging.set_verbosity(verbosity)
    for _, row in trials.iterrows():
        present = [name for name in params if pd.notna(row[f"config.{name}"])]
        study.add_trial(
            optuna.trial.create_trial(
                value=float(row[score]),
                params={
                    name: distribution_value(row[f"config.{name}"], distributions[name])
                    for name in present
                },
                distributions={name: distributions[name] for name in present},
            )
        )
    return study


def observed_distribution(values: pd.Series, scale: str) -> optuna.distributions.BaseDistribution:
    """The values' range (or categories) on the scale they were searched on."""
    if scale == "categories":
        return optuna.distributions.CategoricalDistribution(
            sorted({plain(v) for v in values}, key=str)
        )
    return optuna.distributions.FloatDistribution(
        float(values.min()), float(values.max()), log=scale == "log"
    )


def distribution_value(value: Any, distribution: optuna.distributions.BaseDistribution) -> Any:
    return (
        plain(value)
        if isinstance(distribution, optuna.distributions.CategoricalDistribution)
        else float(value)
    )


# Time and cost -----------------------------------------------------------------------------------


@dataclass
class SearchCost:
    gpu_hours: float
    trial_hours: float  # wall-clock of every trial, added up
    elapsed_hours: float | None  # first trial's start to the last result
    epochs_run: int
    epoch_budget: int  # every trial run to max_epochs
    epochs_saved: int  # the epochs ASHA did not run of the trials it stopped

    @property
    def saved_fraction(self) -> float:
        return self.epochs_saved / self.epoch_budget if self.epoch_budget else 0.0

    @property
    def epochs_not_run(self) -> int:
        """Epochs missing for other reasons: errored trials, trials still running or pending, trials
        the search's budget stopped."""
        return self.epoch_budget - self.epochs_run - self.epochs_saved


def search_cost(results: SearchResults) -> SearchCost:
    trials, max_epochs = results.trials, int(results.search["max_epochs"])
    return SearchCost(
        gpu_hours=float(trials["gpu_hours"].sum()),
        trial_hours=float(trials["wall_s"].sum()) / 3600,
        elapsed_hours=elapsed_hours(results.epochs),
        epochs_run=int(trials["epochs_run"].sum()),
        epoch_budget=len(trials) * max_epochs,
        epochs_saved=int(epochs_saved_per_trial(trials, max_epochs).sum()),
    )


def noisy_stops(results: SearchResults) -> dict[str, dict]:
    """The trials ASHA stopped within noise (``results.within_noise``), by trial id."""
    epochs = results.epochs
    if "val_images" not in epochs or "val_acc" not in epochs:
        return {}
    scored = epochs.dropna(subset=["val_acc"])
    accuracy_at = {
        trial: dict(zip(rows["epoch"].astype(int), rows["val_acc"].astype(float)))
        for trial, rows in scored.groupby("trial_id")
    }
    images = int(epochs["val_images"].max()) if epochs["val_images"].notna().any() else 0
    stopped = results.trials.loc[results.trials["status"] == "stopped_early", "trial_id"]
    found = {trial: within_noise(accuracy_at, trial, images) for trial in stopped}
    return {trial: noise for trial, noise in found.items() if noise}


def epochs_saved_per_trial(trials: pd.DataFrame, max_epochs: int) -> pd.Series:
    return (
        (max_epochs - trials["epochs_run"])
        .where(trials["status"] == "stopped_early", 0)
        .clip(lower=0)
    )


def elapsed_hours(epochs: pd.DataFrame) -> float | None:
    if "timestamp" not in epochs or "time_total_s" not in epochs:
        return None
    timed = epochs.dropna(subset=["timestamp", "time_total_s"])
    if not len(timed):
        return None
    return (
        float(timed["timestamp"].max() - (timed["timestamp"] - timed["time_total_s"]).min()) / 3600
    )


def cost_figure(results: SearchResults, cost: SearchCost) -> Figure:
    trials, max_epochs = results.trials, int(results.search["max_epochs"])
    figure = new_figure(max(6.0, 0.35 * len(trials) + 2), 6.5)
    hours_axes, epochs_axes = figure.subplots(2, 1, sharex=True)
    x = np.arange(len(trials))
    if cost.gpu_hours > 0:
        hours_axes.bar(x, trials["gpu_hours"], color="tab:green")
        hours_axes.set(ylabel="GPU-hours", title=f"{cost.gpu_hours:.2f} GPU-hours in all")
    else:
        hours_axes.bar(x, trials["wall_s"] / 3600, color="tab:gray")
        hours_axes.set(
            ylabel="wall-clock hours",
            title=f"CPU-only: 0 GPU-hours; {cost.trial_hours:.2f} trial wall-clock hours in all",
        )
    run = trials["epochs_run"].to_numpy()
    epochs_axes.bar(x, run, color="tab:blue", label="epochs run")
    epochs_axes.bar(
        x,
        epochs_saved_per_trial(trials, max_epochs),
        bottom=run,
        color="white",
        edgecolor="tab:blue",
        hatch="//",
        label="saved by ASHA",
    )
    epochs_axes.axhline(max_epochs, color="0.3", linewidth=0.8, linestyle="--")
    epochs_axes.set_ylim(0, max_epochs * 1.3)  # room for the legend above the bars
    epochs_axes.set(
        ylabel="epochs",
        title=f"ASHA saved {cost.epochs_saved} of {cost.epoch_budget} trial-epochs "
        f"({cost.saved_fraction:.0%})",
    )
    epochs_axes.legend(loc="upper right", fontsize="small")
    epochs_axes.set_xticks(x, trials["trial_id"], rotation=90, fontsize="small")
    for axes in (hours_axes, epochs_axes):
        axes.grid(axis="y", alpha=0.3)
    return figure


# The refit ----------------------------------------------------------------------------------------

RELIABILITY_BINS = 10


def reliability_bins(
    probs: np.ndarray, targets: np.ndarray, bins: int = RELIABILITY_BINS
) -> pd.DataFrame:
    """Per confidence bin (the top probability): images, mean confidence, accuracy."""
    confidence, right = probs.max(1), probs.argmax(1) == targets
    edges = np.minimum((confidence * bins).astype(int), bins - 1)
    frame = pd.DataFrame({"bin": edges, "confidence": confidence, "right": right})
    return frame.groupby("bin").agg(
        images=("right", "size"), confidence=("confidence", "mean"), accuracy=("right", "mean")
    )


def expected_calibration_error(probs: np.ndarray, targets: np.ndarray) -> float:
    table = reliability_bins(probs, targets)
    return float(
        (table["images"] * (table["confidence"] - table["accuracy"]).abs()).sum() / len(targets)
    )


def reliability_figure(refit: FoldRefit) -> Figure:
    figure = new_figure(5.5, 5)
    axes = figure.subplots()
    table = reliability_bins(refit.probs, refit.targets)
    axes.plot([0, 1], [0, 1], color="0.5", linestyle="--", linewidth=1, label="calibrated")
    axes.bar(
        (table.index + 0.5) / RELIABILITY_BINS,
        table["accuracy"],
        width=0.9 / RELIABILITY_BINS,
        alpha=0.7,
        color="tab:blue",
        label="accuracy per bin",
    )
    axes.plot(table["confidence"], table["accuracy"], marker="o", color="black", linewidth=1)
    axes.set(
        xlim=(0, 1),
        ylim=(0, 1),
        xlabel="confidence (top probability)",
        ylabel="accuracy",
        title=(
            "submitted ensemble, out of fold: "
            f"ECE {expected_calibration_error(refit.probs, refit.targets):.3f}"
        ),
    )
    axes.legend(loc="upper left", fontsize="small")
    axes.grid(alpha=0.3)
    return figure


def refit_section(results: SearchResults, images: list[str]) -> str:
    if not results.refit:
        return ""
    summary = results.refit.fit["out_of_fold"]
    rows = [
        [
            f"`{name}`",
            row["accuracy"],
            row["log_loss"],
            row["log_loss_calibrated"],
            row["temperature"],
            row["weight"],
        ]
        for name, row in summary["members"].items()
    ]
    ensemble, estimate = summary["ensemble"], summary["estimate"]
    rows.append(
        [
            f"**ensemble** ({ensemble['method']})",
            ensemble["accuracy"],
            ensemble["log_loss"],
            "",
            "",
            1.0,
        ]
    )
    table = markdown_table(
        ["member", "accuracy", "log-loss", "log-loss calibrated", "temperature", "weight"], rows
    )
    text = (
        f"## Refit on {summary['folds']} folds ({results.refit.folder})\n\n"
        f"Out-of-fold predictions of {summary['images']} training images.\n\n{table}\n\n"
        "Cross-validated accuracy of the submitted ensemble: "
        f"{number_text(estimate['accuracy'])} ± {number_text(estimate['standard_error'])} "
        "(standard error over folds): the number to expect, not the search's best val_acc "
        f"({number_text(estimate['search_best_val_acc'])})."
    )
    if "reliability.png" in images:
        text += "\n\n![reliability](reliability.png)"
    return text


# summary.md --------------------------------------------------------------------------------------


def summary_markdown(
    results: SearchResults, importance: Importance, cost: SearchCost | None, images: list[str]
) -> str:
    sections = [
        overview_section(results),
        best_section(results),
        top_trials_section(results),
        errors_section(results),
        image_section("Learning curves", ["learning_curves.png"], images),
        image_section(
            "Hyperparameters",
            [param_file(name) for name in results.params] + ["parallel_coordinates.png"],
            images,
        ),
        importance_section(importance, images),
        cost_section(results, cost, images) if cost else "",
        ema_section(results),
        refit_section(results, images),
    ]
    return "\n\n".join(section for section in sections if section) + "\n"


def overview_section(results: SearchResults) -> str:
    counts = ", ".join(
        f"{n} {status}" for status, n in results.trials["status"].value_counts().items()
    )
    return (
        f"# Search report: {results.experiment}\n\n"
        f"- metric: `{results.metric}` ({results.search['mode']})\n"
        f"- searched: {', '.join(f'`{name}`' for name in results.search['searched'])}\n"
        f"- trials: {len(results.trials)}{f' ({counts})' if counts else ''}, "
        f"up to {results.search['max_epochs']} "
        f"epochs each"
    )


def best_section(results: SearchResults) -> str:
    if not results.best:
        return f"## Best trial\n\nNo trial has reported `{results.metric}` yet (no best.json)."
    best = results.best
    values = [
        f"- trial: `{best['trial_id']}` ({best.get('status', 'unknown status')})",
        f"- val_acc: {number_text(best['val_acc'])} at epoch {best['epoch']}",
    ]
    if results.metric != "val_acc":
        values.insert(1, f"- {results.metric}: {number_text(best[results.metric])}")
    row = results.trials[results.trials["trial_id"] == best["trial_id"]]
    drawn = [
        name
        for name in results.search["searched"]  # those its branches made it draw
        if not len(row) or f"config.{name}" not in row or pd.notna(row[f"config.{name}"].iloc[0])
    ]
    values += [f"- `{name}` = {cell_text(best['config'].get(name))}" for name in drawn]
    return "## Best trial\n\n" + "\n".join(values)


INACTIVE = "-"  # a searched parameter the trial's branches did not draw


def top_trials_section(results: SearchResults) -> str:
    if not len(results.scored):
        return ""
    top = results.scored.head(TOP_TRIALS)
    header = ["trial", "status", f"best {results.metric}", "epoch", "epochs run", *results.params]
    rows = [
        [
            f"`{row['trial_id']}`",
            row["status"],
            row[results.score],
            row["best_epoch"],
            row["epochs_run"],
            *(
                INACTIVE if pd.isna(row[f"config.{name}"]) else row[f"config.{name}"]
                for name in results.params
            ),
        ]
        for _, row in top.iterrows()
    ]
    return f"## Top {len(top)} trials\n\n" + markdown_table(header, rows)


def errors_section(results: SearchResults) -> str:
    failed = results.trials[
        (results.trials["status"] == "error") | (results.trials["error"].fillna("") != "")
    ]
    if not len(failed):
        return ""
    lines = [
        f"- `{row['trial_id']}` ({row['status']}): {row['error'] or 'no error text recorded'}"
        for _, row in failed.iterrows()
    ]
    return f"## Errors ({len(failed)} trials)\n\n" + "\n".join(lines)


def image_section(title: str, wanted: list[str], images: list[str]) -> str:
    present = [name for name in wanted if name in images]
    if not present:
        return ""
    return f"## {title}\n\n" + "\n".join(
        f"![{name.removesuffix('.png')}]({name})" for name in present
    )


def importance_section(importance: Importance, images: list[str]) -> str:
    lines = ["## Hyperparameter importance", "", importance.note]
    if importance.values:
        lines += [
            "",
            markdown_table(["hyperparameter", "importance"], list(importance.values.items())),
        ]
    if "importance.png" in images:
        lines += ["", "![importance](importance.png)"]
    return "\n".join(lines)


def cost_section(results: SearchResults, cost: SearchCost, images: list[str]) -> str:
    trials = results.trials
    if cost.gpu_hours > 0:
        gpu = (
            f"- GPU-hours: {cost.gpu_hours:.3f} in all; "
            f"per trial {trials['gpu_hours'].mean():.3f} on average, "
            f"{trials['gpu_hours'].max():.3f} at most"
        )
    else:
        gpu = "- GPU-hours: 0 (a CPU-only search: no GPU per trial); wall-clock hours below"
    lines = [
        "## Time and cost",
        "",
        gpu,
        f"- trial wall-clock: {cost.trial_hours:.3f} hours in all; "
        f"per trial {trials['wall_s'].mean():.0f} s "
        f"on average, {trials['wall_s'].max():.0f} s at most",
    ]
    if cost.elapsed_hours is not None:
        lines.append(
            f"- search elapsed (first trial start to last result): {cost.elapsed_hours:.3f} hours"
        )
    lines.append(
        f"- trial-epochs: {cost.epochs_run} run of {cost.epoch_budget} ({len(trials)} trials x "
        f"{results.search['max_epochs']} epochs); ASHA's early stopping saved {cost.epochs_saved} "
        f"({cost.saved_fraction:.0%})"
    )
    noisy = noisy_stops(results)
    if noisy:
        stops = int((trials["status"] == "stopped_early").sum())
        lines.append(
            f"- {len(noisy)} of {stops} early stops fell within one standard error of the best "
            "val_acc at their epoch, where the validation set cannot tell them from noise: "
            + ", ".join(
                f"`{trial}` ({n['val_acc']:.3f} against {n['best']:.3f} ± "
                f"{n['standard_error']:.3f} at epoch {n['epoch']})"
                for trial, n in noisy.items()
            )
        )
    if cost.epochs_not_run:
        lines.append(
            f"- {cost.epochs_not_run} trial-epochs not run for other reasons (errored, running or "
            f"pending trials, or trials the budget stopped)"
        )
    if "cost.png" in images:
        lines += ["", "![cost](cost.png)"]
    return "\n".join(lines)


def ema_section(results: SearchResults) -> str:
    """What the EMA average did in the trials that kept one: its best val_acc against the raw
    weights' best, each over the trial's epochs."""
    if "val_acc_ema" not in results.epochs or not results.epochs["val_acc_ema"].notna().any():
        return ""
    averaged = results.epochs.dropna(subset=["val_acc_ema", "val_acc_raw"]).groupby("trial_id")
    best = averaged[["val_acc_ema", "val_acc_raw"]].max()
    gain = best["val_acc_ema"] - best["val_acc_raw"]
    rows = [
        [f"`{trial}`", row["val_acc_ema"], row["val_acc_raw"], gain[trial]]
        for trial, row in best.iterrows()
    ]
    return (
        f"## EMA\n\n{len(best)} trial(s) kept an EMA of their weights; best val_acc of the average "
        f"minus the raw weights': {number_text(gain.median())} median, {number_text(gain.min())} "
        f"to {number_text(gain.max())}.\n\n"
        + markdown_table(["trial", "best val_acc, EMA", "best val_acc, raw", "EMA - raw"], rows)
    )


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell_text(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def cell_text(value: Any) -> str:
    if isinstance(value, (float, np.floating)):
        return number_text(value)
    return str(plain(value)).replace("|", "\\|")


def number_text(value: Any) -> str:
    return "n/a" if pd.isna(value) else f"{float(value):.4g}"


if __name__ == "__main__":
    sys.exit(main())
