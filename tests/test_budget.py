"""One budget for the search and its final fit: the split, and what is left after the search."""

import pandas as pd
import pytest

from ray_jobs.final_fit import budget_left, budget_left_line
from ray_jobs.refit import ModelSpec, budget_sized, seconds_per_model
from ray_jobs.space import SearchSettings
from ray_jobs.tuning import budget_split, ended_by


def test_the_search_stops_where_the_final_fits_share_of_the_budget_begins():
    settings = SearchSettings(budget_hours=2.0, budget_gpu_hours=10.0, final_fit_share=0.25)
    assert ended_by(settings, {"hours": 1.49, "gpu_hours": 7.49}) is None
    assert ended_by(settings, {"hours": 1.5, "gpu_hours": 0.0}) == "budget_hours"
    assert ended_by(settings, {"hours": 0.1, "gpu_hours": 7.5}) == "budget_gpu_hours"
    line = budget_split(settings)
    assert line.startswith(
        "budget: 2 hours (the search 1.5) and 10 GPU-hours (the search 7.5), for "
        "the search and its final fit: 25% (search.final_fit_share) is kept"
    )
    assert budget_split(SearchSettings()) is None  # no budget, nothing to split
    with pytest.raises(Exception, match="final_fit_share: expected a value <= 0.9"):
        from sketch_core.settings import from_mapping

        from_mapping(SearchSettings, {"final_fit_share": 1.0}, source="x.yaml", prefix="search.")


def test_the_final_fit_is_told_what_the_search_left_of_the_budget():
    search = {
        "budget": {"hours": 2.0, "gpu_hours": 0.0, "final_fit_share": 0.25},
        "spent": {"hours": 1.55, "gpu_hours": 0.0},
    }
    assert budget_left(search) == pytest.approx({"hours": 0.45})  # no GPU-hour budget
    assert (
        budget_left_line(budget_left(search), search["budget"])
        == "budget left for the final fit: 0.45 of 2 hours"
    )
    assert budget_left({"budget": {"hours": 0.0, "gpu_hours": 0.0}}) == {}


def test_the_budget_left_is_shared_by_the_refits_that_run_one_after_another():
    left = {"hours": 0.1, "gpu_hours": 0.2}
    # 360 s of wall clock, 20 of them gone: 3 refits 2 at a time run in two rounds of 170 s.
    assert seconds_per_model(left, models=3, at_once=2, gpus=0, elapsed_s=20) == pytest.approx(170)
    # 720 GPU-seconds over 3 refits holding 2 GPUs each: 120 s of wall clock, the tighter limit.
    assert seconds_per_model(left, models=3, at_once=3, gpus=6, elapsed_s=20) == pytest.approx(120)
    assert seconds_per_model({"hours": 0.001}, models=1, at_once=1, gpus=0, elapsed_s=20) == 0
    assert seconds_per_model({}, models=1, at_once=1, gpus=0, elapsed_s=0) is None
    # A GPU-hour budget does not limit refits that hold no GPU.
    assert seconds_per_model({"gpu_hours": 1.0}, models=1, at_once=1, gpus=0, elapsed_s=0) is None


def test_a_refit_gets_the_epochs_its_trial_s_pace_fits_in_the_seconds_given():
    from sketch_core.config import TrainConfig

    base = TrainConfig(data_dir="/data", model="test_resnet", val_fraction=0.2, epochs=10).to_dict()
    trials = pd.DataFrame([{"trial_id": "t1", "config.lr": 0.01}])
    # 18 s to start, then 2 s per epoch on 80% of the training images (the median, not the mean).
    epochs = pd.DataFrame(
        {"trial_id": "t1", "epoch": [1, 2, 3, 4, 5], "trial_s": [20.0, 22.0, 24.0, 26.0, 40.0]}
    )

    def spec(model_id, **split):
        config = TrainConfig.from_dict({**base, "lr": 0.01, **split}).to_dict()
        return ModelSpec(model_id, model_id[:4], "t1", config, until_epoch=4)

    specs = [spec("top1", val_fraction=0.0), spec("top1-fold0", folds=5, fold=0)]
    sized, lines = budget_sized(specs, trials=trials, epochs=epochs, base=base, seconds=118)
    # All the data: 2.5 s per epoch, (118 - 18) / 2.5 = 40 epochs, less one for predicting.
    # Four folds of five: 80% of the images as in the trial, 2 s per epoch: 50 - 1.
    assert [(s.config["epochs"], s.until_epoch) for s in sized] == [(39, 39), (49, 49)]
    assert [s.config["lr"] for s in sized] == [0.01, 0.01]  # nothing else changes
    assert lines[0] == (
        "top1: 39 epochs (trial t1: 18 s to start, 2 s per epoch on 80% of the training "
        "images, so 2.5 s on 100%)"
    )
    # The budget spent: one epoch still, the least a refit can train.
    assert (
        budget_sized(specs[:1], trials=trials, epochs=epochs, base=base, seconds=0)[0][
            0
        ].until_epoch
        == 1
    )
