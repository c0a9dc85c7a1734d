"""tune.py's console: a line per epoch and per ended trial in a log, a table redrawn in place on a
terminal."""

import io
from types import SimpleNamespace

import pytest

from ray_jobs.console import ConsoleReporter
from ray_jobs.params import Branch, Distribution, Param, SearchedParams

# head_hidden is searched only where head is mlp: "-" for the others.
SEARCHED = SearchedParams(
    (
        Param("head", (Branch((), Distribution("choice", ("linear", "mlp"))),)),
        Param("head_hidden", (Branch((("head", ("mlp",)),), Distribution("choice", (64, 256))),)),
        Param("lr", (Branch((), Distribution("loguniform", (1e-3, 1e-1))),)),
    )
)


def trial(trial_id, status="RUNNING", lr=0.01, head="mlp"):
    return SimpleNamespace(
        trial_id=trial_id,
        status=status,
        config={"lr": lr, "head": head, "head_hidden": 64, "epochs": 4},
    )


class Screen(io.StringIO):
    def __init__(self, tty: bool):
        super().__init__()
        self.tty = tty

    def isatty(self):
        return self.tty


@pytest.fixture
def reporter():
    reporter = ConsoleReporter(searched=SEARCHED, metric="val_acc", mode="max", max_epochs=4)
    reporter.setup()
    return reporter


def play(reporter, monkeypatch, *, tty: bool) -> str:
    """Two trials: a reports two epochs and is stopped early, b finishes all four."""
    screen = Screen(tty)
    monkeypatch.setattr("sys.stdout", screen)
    a, b = trial("a", lr=0.02), trial("b", head="linear")
    for epoch, acc in ((1, 0.3), (2, 0.25)):
        reporter.on_trial_result(
            0, [a, b], a, {"epoch": epoch, "val_acc": acc, "val_loss": 1.5, "images_per_s": 300.0}
        )
    a.status = "TERMINATED"
    reporter.on_trial_complete(0, [a, b], a)
    for epoch in range(1, 5):
        reporter.on_trial_result(
            0, [a, b], b, {"epoch": epoch, "val_acc": 0.1 * epoch, "train_loss": 2.0}
        )
    b.status = "TERMINATED"
    reporter.on_trial_complete(0, [a, b], b)
    reporter.on_trial_error(0, [a, b], trial("c", status="ERROR"))
    reporter.on_experiment_end([a, b])
    return screen.getvalue()


def test_a_log_gets_a_line_per_epoch_and_per_ended_trial(reporter, monkeypatch):
    lines = play(reporter, monkeypatch, tty=False).splitlines()
    assert lines[0] == "trial a epoch 1/4: val_acc 0.3000  val_loss 1.5000  images/s 300"
    assert (
        "trial a stopped_early after 2 epoch(s): best val_acc 0.3000 at epoch 1; "
        "head=mlp, head_hidden=64, lr=0.02" in lines
    )
    assert (
        "trial b finished after 4 epoch(s): best val_acc 0.4000 at epoch 4; "
        "head=linear, head_hidden=-, lr=0.01" in lines
    )
    assert (
        "trial c error after 0 epoch(s): no val_acc reported; head=mlp, head_hidden=64, lr=0.01"
        in lines
    )
    assert len(lines) == 2 + 1 + 4 + 1 + 1 and "\x1b" not in "".join(lines)


def test_a_terminal_gets_a_table_redrawn_in_place(reporter, monkeypatch):
    output = play(reporter, monkeypatch, tty=True)
    redraws = output.split(
        "\x1b[4F\x1b[J"
    )  # each redraw moves up over the 4-line table and clears it
    assert len(redraws) >= 6 and redraws[-1] == ""  # the table is gone once the search ends
    # What stays on screen: the lines saying how each trial ended.
    assert [
        line
        for part in redraws
        for line in part.splitlines()
        if line.startswith("trial ") and "after" in line
    ] == [
        "trial a stopped_early after 2 epoch(s): best val_acc 0.3000 at epoch 1; "
        "head=mlp, head_hidden=64, lr=0.02",
        "trial b finished after 4 epoch(s): best val_acc 0.4000 at epoch 4; "
        "head=linear, head_hidden=-, lr=0.01",
        "trial c error after 0 epoch(s): no val_acc reported; head=mlp, head_hidden=64, lr=0.01",
    ]
    last_table = redraws[-2].splitlines()[-4:]
    assert last_table[0].endswith("trials: 1 finished, 1 stopped_early")
    assert [row.split() for row in last_table[1:]] == [
        ["trial", "status", "epoch", "val_acc", "best", "head", "head_hidden", "lr"],
        ["b", "finished", "4", "0.4000", "0.4000", "linear", "-", "0.01"],  # best first
        ["a", "stopped_early", "2", "0.2500", "0.3000", "mlp", "64", "0.02"],
    ]
    assert "epoch 1/4" not in output  # no per-epoch lines: the table shows them


def test_an_early_stop_within_one_standard_error_of_the_best_is_called_noise(reporter, monkeypatch):
    """val_acc on 400 images has a standard error of about 0.025 near 0.5: a stop 0.01 below the
    best at its epoch is noise, one 0.1 below is not."""
    screen = Screen(False)
    monkeypatch.setattr("sys.stdout", screen)
    best, close, far = trial("best"), trial("close"), trial("far")
    for epoch in (1, 2):
        for each, acc in ((best, 0.50), (close, 0.49), (far, 0.40)):
            reporter.on_trial_result(
                0, [best, close, far], each, {"epoch": epoch, "val_acc": acc, "val_images": 400}
            )
    for stopped in (close, far):
        stopped.status = "TERMINATED"
        reporter.on_trial_complete(0, [best, close, far], stopped)
    lines = screen.getvalue().splitlines()
    noise = [line for line in lines if "within noise" in line]
    assert noise == [
        "  the stop is within noise: val_acc 0.4900 at epoch 2 is within one standard error "
        "(0.025 on 400 validation images) of the best then, 0.5000"
    ]
    assert lines.index(noise[0]) == 1 + lines.index(
        next(line for line in lines if line.startswith("trial close stopped"))
    )


def test_of_tied_epochs_the_ended_line_names_the_latest_as_the_tables_do(reporter, monkeypatch):
    # results.best_epochs: Ray keeps the checkpoint of the latest of equal epochs.
    screen = Screen(tty=False)
    monkeypatch.setattr("sys.stdout", screen)
    a = trial("a")
    for epoch, acc in ((1, 0.5), (2, 0.7), (3, 0.6), (4, 0.7)):
        reporter.on_trial_result(0, [a], a, {"epoch": epoch, "val_acc": acc})
    reporter.on_trial_complete(0, [a], a)
    ended = "trial a finished after 4 epoch(s): best val_acc 0.7000 at epoch 4; "
    assert ended in screen.getvalue()
