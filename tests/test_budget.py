"""One budget for the search and its final fit: the split, and what is left after the search."""

import pytest

from ray_jobs.final_fit import budget_left
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
    assert budget_left(search) == "budget left for the final fit: 0.45 of 2 hours"
    assert budget_left({"budget": {"hours": 0.0, "gpu_hours": 0.0}}) is None
