"""What a person watching tune.py or final_fit.py reads: the searched values and metrics, not
Ray's chatter.

``ConsoleReporter`` is a Ray Tune callback on the driver. In a log (stdout not a terminal) it
prints plain lines: one per reported epoch and one when a trial ends (how, its best metric, its
searched values). On a terminal it keeps a small table of the trials in progress and the best
ones so far, redrawn in place, and prints the same end-of-trial lines above it. Ray's own output
(Tune's tables and trial configuration boxes, the Train workers' lines) is left to the Ray logs
unless ``--verbose`` asks for it; Tune prints its experiment box at start at any verbosity.
``RefitReporter`` does the same for final_fit.py's refits.
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from typing import Any

from ray.tune import Callback

from ray_jobs.params import SearchedParams
from ray_jobs.results import best_first, trial_status, within_noise

TABLE_ROWS = 8  # trials shown in the live table: those running, then the best ended ones


class ConsoleReporter(Callback):
    def __init__(self, *, searched: SearchedParams, metric: str, mode: str, max_epochs: int):
        self.searched, self.metric, self.mode, self.max_epochs = searched, metric, mode, max_epochs
        self.last: dict[str, dict[str, Any]] = {}  # trial id: its last reported result
        self.best: dict[str, tuple[float, int]] = {}  # trial id: (best metric, its epoch)
        self.history: dict[str, dict[int, dict]] = {}  # trial id: epoch: its result
        self._images = 0  # validation images behind each val_acc
        self._drawn = 0  # lines of the live table on screen

    # Not pickled with Tune's experiment state: the screen is this process's.
    def __getstate__(self):
        return {**self.__dict__, "_drawn": 0}

    def setup(self, **info):
        self._started = time.monotonic()

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if "epoch" not in result:
            return
        self.last[trial.trial_id] = result
        self.history.setdefault(trial.trial_id, {})[int(result["epoch"])] = result
        self._images = int(result.get("val_images") or self._images)
        value = result.get(self.metric)
        # Of equal values the latest epoch, as in the tables (results.best_epochs).
        if value is not None and (
            trial.trial_id not in self.best or not self._better(self.best[trial.trial_id][0], value)
        ):
            self.best[trial.trial_id] = (float(value), int(result["epoch"]))
        if self._tty():
            self._redraw(trials)
        else:
            self._print(
                f"trial {trial.trial_id} epoch {int(result['epoch'])}/{self.max_epochs}: "
                + self._metrics(result)
            )

    def on_trial_complete(self, iteration, trials, trial, **info):
        # Tune sets the status after the callbacks: say what it is about to be.
        self._ended(trials, trial, trial_status("TERMINATED", self._epochs(trial), self.max_epochs))

    def on_trial_error(self, iteration, trials, trial, **info):
        self._ended(trials, trial, "error")

    def on_experiment_end(self, trials, **info):
        self._erase()

    def _ended(self, trials, trial, status: str) -> None:
        best = self.best.get(trial.trial_id)
        outcome = (
            f"best {self.metric} {best[0]:.4f} at epoch {best[1]}"
            if best
            else f"no {self.metric} reported"
        )
        self._erase()
        self._print(
            f"trial {trial.trial_id} {status} after {self._epochs(trial)} epoch(s): {outcome}; "
            f"{self._values(trial)}"
        )
        noise = self._stopped_within_noise(trial) if status == "stopped_early" else None
        if noise:
            self._print(
                f"  the stop is within noise: val_acc {noise['val_acc']:.4f} at epoch "
                f"{noise['epoch']} is within one standard error ({noise['standard_error']:.3f} on "
                f"{self._images} validation images) of the best then, {noise['best']:.4f}"
            )
        if self._tty():
            self._redraw(trials)

    def _stopped_within_noise(self, trial) -> dict | None:
        accuracy_at = {
            trial_id: {epoch: r["val_acc"] for epoch, r in history.items() if "val_acc" in r}
            for trial_id, history in self.history.items()
        }
        return within_noise(accuracy_at, trial.trial_id, self._images)

    def _epochs(self, trial) -> int:
        return int(self.last.get(trial.trial_id, {}).get("epoch", 0))

    def _status(self, trial) -> str:
        return trial_status(trial.status, self._epochs(trial), self.max_epochs)

    def _better(self, value: float, than: float) -> bool:
        return value > than if self.mode == "max" else value < than

    def _metrics(self, result: dict[str, Any]) -> str:
        return metrics_text(result, self.metric)

    def _values(self, trial) -> str:
        return ", ".join(f"{name}={self._value(trial, name)}" for name in self.searched.names)

    def _value(self, trial, name: str) -> str:
        """A searched value, or "-" where the trial's branches left the parameter inactive."""
        return _short(trial.config.get(name)) if name in self.searched.active(trial.config) else "-"

    def _table(self, trials) -> list[str]:
        running = [t for t in trials if t.status == "RUNNING"]
        ended = [t for t in trials if t.status != "RUNNING" and t.trial_id in self.best]
        ended = [ended[i] for i in best_first([self.best[t.trial_id][0] for t in ended], self.mode)]
        counts = Counter(self._status(t) for t in trials)
        elapsed = time.strftime(
            "%H:%M:%S", time.gmtime(time.monotonic() - getattr(self, "_started", time.monotonic()))
        )
        lines = [
            f"[{elapsed}] trials: "
            + ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
        ]
        header = ["trial", "status", "epoch", self.metric, "best", *self.searched.names]
        rows = [
            [
                t.trial_id,
                self._status(t),
                str(self._epochs(t)),
                _number(self.last.get(t.trial_id, {}).get(self.metric)),
                _number(self.best.get(t.trial_id, (None,))[0]),
                *(self._value(t, name) for name in self.searched.names),
            ]
            for t in (running + ended)[:TABLE_ROWS]
        ]
        widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
        return lines + [
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()
            for row in [header, *rows]
        ]

    def _redraw(self, trials) -> None:
        self._erase()
        lines = self._table(trials)
        sys.stdout.write("\n".join(lines) + "\n")
        sys.stdout.flush()
        self._drawn = len(lines)

    def _erase(self) -> None:
        if self._drawn:
            sys.stdout.write(
                f"\x1b[{self._drawn}F\x1b[J"
            )  # up to the table's first line, clear below
            self._drawn = 0

    def _print(self, line: str) -> None:
        print(line, flush=True)

    @staticmethod
    def _tty() -> bool:
        return sys.stdout.isatty()


class RefitReporter(Callback):
    """What a person watching final_fit.py reads: a line per trained epoch of each model and one
    when it has predicted the test set. (Ray's own output: ``final_fit.py --verbose``.)"""

    def on_trial_result(self, iteration, trials, trial, result, **info):
        job = trial.config[
            "job"
        ]  # refit.fit_models' job: the model's id and the epoch it trains to
        if "predicted" in result:
            done = (
                f"as it was at epoch {int(result['epoch'])}"
                if (job["start"] or {}).get("whole")
                else f"trained {int(result['epoch'])} epoch(s) and"
            )
            print(
                f"{job['model_id']} {done} predicted {int(result['predicted'])} test images",
                flush=True,
            )
        elif "epoch" in result:
            print(
                f"{job['model_id']} epoch {int(result['epoch'])}/{job['until_epoch']}: "
                + metrics_text(result, "val_acc"),
                flush=True,
            )


def metrics_text(result: dict[str, Any], metric: str) -> str:
    """``metric``, val_loss and train_loss of a reported result, as far as it has them, and
    images/s."""
    shown = [name for name in dict.fromkeys((metric, "val_loss", "train_loss")) if name in result]
    text = "  ".join(f"{name} {float(result[name]):.4f}" for name in shown)
    return text + (
        f"  images/s {float(result['images_per_s']):.0f}" if "images_per_s" in result else ""
    )


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _number(value: Any) -> str:
    return "-" if value is None else f"{float(value):.4f}"
