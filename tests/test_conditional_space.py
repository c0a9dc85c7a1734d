"""Conditional parameters, searchable backbones, start points, warm starts and budgets: what the
space file says, what each searcher draws from it, and what the tables keep (no Ray cluster)."""

import copy
import dataclasses
import math
import re

import numpy as np
import pytest
from conftest import scratch_study

from ray_jobs.results import ExperimentTables, ResultsStore, TrialState, config_of
from ray_jobs.space import Resources, parse_space
from ray_jobs.tuning import Budget, _searcher, ended_by, warm_start_trials
from sketch_core.errors import SketchError

SPACE = {
    "experiment": "cond",
    "model": {"name": "test_resnet", "image_size": 32},
    "search": {"searcher": "optuna", "num_samples": 8, "seed": 0},
    "scheduler": {"type": "asha", "max_epochs": 4},
    "fixed": {
        "batch_size": 16,
        "trainable_blocks": 1,
    },  # trainable_blocks where the branch leaves it inactive
    "space": {
        "freeze": {"choice": ["head", "last_n_blocks", "none"]},
        "lr": [
            {"when": {"freeze": "head"}, "loguniform": [3.0e-3, 3.0e-2]},
            {"loguniform": [1.0e-5, 1.0e-3]},
        ],
        "trainable_blocks": [{"when": {"freeze": "last_n_blocks"}, "choice": [2, 4]}],
        "mixup_alpha": [{"when": {"freeze": "head"}, "choice": [0.0]}, {"choice": [0.0, 0.2]}],
    },
}


def space_with(**sections):
    document = copy.deepcopy(SPACE)
    for name, values in sections.items():
        document[name] = values if name == "experiment" else {**document.get(name, {}), **values}
    return parse_space(document, source="spaces/c.yaml")


def assert_follows_the_branches(values: dict) -> None:
    head = values["freeze"] == "head"
    assert 3.0e-3 <= values["lr"] <= 3.0e-2 if head else 1.0e-5 <= values["lr"] <= 1.0e-3, values
    assert ("trainable_blocks" in values) == (values["freeze"] == "last_n_blocks"), values
    assert values["mixup_alpha"] == 0.0 if head else values["mixup_alpha"] in (0.0, 0.2), values


@pytest.mark.parametrize(
    "name, spec, message",
    [
        (
            "lr",
            [{"when": {"bogus": 1}, "loguniform": [1e-4, 1e-3]}],
            "space.lr[0].when.bogus: unknown parameter; "
            "expected one of the parameters searched before lr: freeze",
        ),
        (
            "lr",
            [{"when": {"mixup_alpha": 0.2}, "loguniform": [1e-4, 1e-3]}],
            "space.lr[0].when.mixup_alpha: mixup_alpha is searched after lr; "
            "a condition can only name a parameter searched before it",
        ),
        (
            "lr",
            [{"when": {"optimizer": "sgd"}, "loguniform": [1e-4, 1e-3]}],
            "space.lr[0].when.optimizer: optimizer is not searched",
        ),
        (
            "lr",
            [{"when": {"freeze": "partial"}, "loguniform": [1e-4, 1e-3]}],
            "space.lr[0].when.freeze: 'partial' is not one of freeze's values "
            "(head, last_n_blocks, none)",
        ),
        (
            "lr",
            [
                {"loguniform": [1e-4, 1e-3]},
                {"when": {"freeze": "head"}, "loguniform": [1e-3, 1e-2]},
            ],
            "space.lr[1]: can never match: the branch before it (without when) "
            "takes every trial it would",
        ),
        (
            "lr",
            [
                {"when": {"freeze": ["head", "none"]}, "loguniform": [1e-4, 1e-3]},
                {"when": {"freeze": "head"}, "loguniform": [1e-3, 1e-2]},
            ],
            "space.lr[1]: can never match: the branch before it (when freeze=head or none) "
            "takes every trial it would",
        ),
        ("lr", [0.1], "space.lr[0]: expected a branch such as {when: {freeze: head}, loguniform:"),
        ("lr", [], "space.lr: expected a distribution or a non-empty list of branches"),
        (
            "lr",
            [{"when": {"freeze": "head"}, "loguniform": [1e-4, 1e-3], "uniform": [0, 1]}],
            "space.lr[0]: expected one distribution such as",
        ),
        (
            "lr",
            [{"when": "freeze", "loguniform": [1e-4, 1e-3]}],
            "space.lr[0].when: expected a mapping of parameters",
        ),
        (
            "lr",
            [{"when": {"freeze": "head"}, "loguniform": [-1.0, 1e-3]}],
            "space.lr[0]: loguniform: bounds must be > 0",
        ),
        # every branch's bounds make a valid config under its conditions
        ("mixup_alpha", [{"when": {"freeze": "none"}, "choice": [0.0, 0.2]}], None),
    ],
)
def test_invalid_branches_are_one_line_naming_the_field(name, spec, message):
    document = copy.deepcopy(SPACE)
    document["space"][name] = spec
    if message is None:  # Mixup needs an even batch, and this branch draws it for freeze: none
        document["fixed"]["batch_size"] = 15
        message = "space.mixup_alpha[0]: batch_size: Mixup/CutMix needs an even batch size, got 15"
    with pytest.raises(SketchError) as caught:
        parse_space(document, source="spaces/c.yaml")
    text = str(caught.value)
    assert text.startswith("spaces/c.yaml: ") and message in text and "\n" not in text, text


def test_a_condition_on_a_range_and_a_fixed_value_no_trial_uses_are_refused():
    document = copy.deepcopy(SPACE)
    document["space"] = {
        "label_smoothing": {"uniform": [0.0, 0.2]},
        "lr": [{"when": {"label_smoothing": 0.1}, "loguniform": [1e-4, 1e-3]}],
    }
    with pytest.raises(
        SketchError,
        match=r"space.lr\[0\].when.label_smoothing: label_smoothing is searched over a "
        "range; a condition needs a choice or grid parameter",
    ):
        parse_space(document, source="spaces/c.yaml")
    document = copy.deepcopy(SPACE)
    document["fixed"]["lr"] = 0.1  # lr has an unconditional branch: every trial draws it
    with pytest.raises(SketchError, match="space.lr: also set in fixed, which no trial would use"):
        parse_space(document, source="spaces/c.yaml")


def test_optuna_asks_define_by_run_with_a_study_parameter_per_branch(tmp_path):
    space = space_with()
    searcher, trials = _searcher(space, study=scratch_study(tmp_path))
    assert trials == 8
    drawn = [searcher.suggest(f"t{i}") for i in range(24)]
    for values in drawn:
        assert_follows_the_branches(values)
    assert {values["freeze"] for values in drawn} == {"head", "last_n_blocks", "none"}
    # TPE models each branch of lr apart; a one-branch parameter keeps its name.
    names = {name for trial in searcher._ot_study.trials for name in trial.params}
    assert names == {
        "freeze",
        "lr|freeze=head",
        "lr|otherwise",
        "trainable_blocks",
        "mixup_alpha|freeze=head",
        "mixup_alpha|otherwise",
    }


@pytest.mark.parametrize("searcher", ["random", "grid"])
def test_random_and_grid_searches_draw_the_same_branches(searcher, tmp_path):
    changes = (
        {"lr": [{"when": {"freeze": "head"}, "choice": [1.0e-2]}, {"choice": [1.0e-4, 1.0e-3]}]}
        if searcher == "grid"
        else {}
    )
    space = space_with(search={"searcher": searcher, "num_samples": 6}, space=changes)
    generator, trials = _searcher(space, study=scratch_study(tmp_path))
    drawn = generator.trials
    assert len(drawn) == trials
    for values in drawn:
        assert_follows_the_branches(values)
    if (
        searcher == "grid"
    ):  # every combination the branches allow, six times: 1 head + 2x2x2 partial + 2x2 full
        assert trials == 6 * 13 and len({tuple(sorted(v.items())) for v in drawn}) == 13
    else:
        again, _ = _searcher(space, study=scratch_study(tmp_path))
        assert trials == 6 and again.trials == drawn  # seeded


def test_start_from_is_tried_first_by_every_searcher_and_checked(tmp_path):
    recipe = {"freeze": "last_n_blocks", "trainable_blocks": 4, "lr": 1.0e-4}
    for searcher in ("optuna", "random", "grid"):
        space = space_with(
            search={"searcher": searcher, "start_from": [recipe]},
            space={
                "lr": [
                    {"when": {"freeze": "head"}, "choice": [1.0e-2]},
                    {"choice": [1.0e-4, 1.0e-3]},
                ]
            },
        )
        made, trials = _searcher(space, study=scratch_study(tmp_path))
        first = made.suggest("first") if searcher == "optuna" else made.trials[0]
        assert first == {
            **recipe,
            "mixup_alpha": 0.0,
        }  # mixup_alpha left out: its default, inside its branch
        assert (
            trials == (13 * 8 if searcher == "grid" else 8) + 1
        )  # the grid num_samples times, or 8 draws
    with pytest.raises(
        SketchError, match=r"search.start_from\[0\].epochs: not a searched parameter"
    ):
        space_with(search={"start_from": [{"epochs": 3}]})
    with pytest.raises(
        SketchError, match=r"search.start_from\[0\]: lr=0.001 is outside loguniform \[0.003, 0.03\]"
    ):
        space_with(
            search={"start_from": [{"freeze": "head"}]}
        )  # lr's default is not in the head branch


def test_inactive_parameters_are_empty_in_the_tables_and_refits_get_the_fixed_value():
    space = space_with()
    tables = ExperimentTables(
        metric="val_acc",
        mode="max",
        max_epochs=4,
        resources=space.resources,
        params=space.params,
        base=space.base,
    )
    head = {**space.base, "freeze": "head", "lr": 1e-2, "mixup_alpha": 0.0}
    partial = {
        **space.base,
        "freeze": "last_n_blocks",
        "trainable_blocks": 4,
        "lr": 1e-4,
        "mixup_alpha": 0.2,
    }
    for trial_id, accuracy in (("head", 0.6), ("partial", 0.4)):
        tables.add_result(trial_id, {"epoch": 1, "val_acc": accuracy, "time_this_iter_s": 1.0})
    frame = tables.trials_frame(
        [TrialState("head", "TERMINATED", head), TrialState("partial", "TERMINATED", partial)]
    )
    rows = frame.set_index("trial_id")
    assert (
        math.isnan(rows.loc["head", "config.trainable_blocks"])
        and rows.loc["partial", "config.trainable_blocks"] == 4
    )
    assert rows.loc["head", "config.batch_size"] == 16  # not searched: always there
    assert (
        config_of(rows.loc["head"], space.base)["trainable_blocks"] == 1
    )  # fixed: what the trial ran with
    assert tables.best(frame)["config"] == {**head, "trainable_blocks": 1}


def test_backbone_and_resolution_are_searchable_with_resources_per_model(tmp_path):
    document = copy.deepcopy(SPACE)
    document["model"] = {
        "name": {"choice": ["test_resnet", "test_vit"]},
        "image_size": [{"when": {"model": "test_vit"}, "choice": [32]}, {"choice": [32, 48]}],
    }
    document["resources"] = {
        "workers": 2,
        "cpus_per_worker": 1,
        "gpus_per_worker": 1,
        "by_model": {"test_vit": {"workers": 4}},
    }
    document["space"]["lr"] = [
        {"when": {"model": "test_vit", "freeze": "none"}, "loguniform": [1e-5, 1e-4]},
        {"loguniform": [1e-4, 1e-2]},
    ]
    space = parse_space(document, source="spaces/c.yaml")
    assert space.params.names[:3] == ["model", "image_size", "freeze"] and space.models() == [
        "test_resnet",
        "test_vit",
    ]
    assert space.base["model"] == "test_resnet" and space.base["image_size"] == 32
    full = {**space.base, "freeze": "none"}
    assert space.resources.of_trial(full) == {"CPU": 2.05, "GPU": 2.0}
    assert space.resources.of_trial({**full, "model": "test_vit"}) == {"CPU": 4.05, "GPU": 4.0}
    assert space.resources.of_trial({**full, "model": "test_vit", "freeze": "head"}) == {
        "CPU": 1.0,
        "GPU": 0.125,
    }
    assert (
        Resources.from_dict(dataclasses.asdict(space.resources)) == space.resources
    )  # search.json and back
    searcher, _ = _searcher(space, study=scratch_study(tmp_path))
    for values in (searcher.suggest(f"t{i}") for i in range(12)):
        assert (
            values["image_size"] == 32
            if values["model"] == "test_vit"
            else values["image_size"] in (32, 48)
        )
    for model, spec, message in [
        (
            {"name": {"uniform": [1, 2]}},
            None,
            "model.name: expected a choice (or grid) of values, got a range",
        ),
        (
            {"name": {"choice": ["test_resnet", "no_such_net"]}},
            None,
            "model.name: model: unknown timm model",
        ),
        (
            None,
            {"by_model": {"resnet50": {"workers": 1}}},
            "resources.by_model.resnet50: not one of model.name's",
        ),
    ]:
        bad = copy.deepcopy(document)
        bad["model"] = {**bad["model"], **(model or {})}
        bad["resources"] = {**bad["resources"], **(spec or {})}
        if model:
            bad["space"]["lr"] = {"loguniform": [1e-4, 1e-2]}
            bad["model"]["image_size"] = 32
        with pytest.raises(SketchError, match=re.escape(message)):
            parse_space(bad, source="spaces/c.yaml")


def earlier_search(
    tmp_path, space, lrs: list[float], unscored: int = 0, **overrides
) -> ResultsStore:
    """An earlier experiment's results as a search writes them: accuracy peaks at lr 1e-2. The
    ``unscored`` trials ended (a budget stopped them) before reporting an epoch."""
    from ray_jobs.tune import search_summary

    store = ResultsStore(str(tmp_path / "results"), "earlier")
    tables = ExperimentTables(
        metric="val_acc",
        mode="max",
        max_epochs=4,
        resources=space.resources,
        params=space.params,
        base=space.base,
    )
    states = []
    for i, lr in enumerate(lrs):
        accuracy = 0.8 - 0.2 * abs(math.log10(lr / 1e-2))
        for epoch in (1, 2):
            tables.add_result(
                f"t{i}", {"epoch": epoch, "val_acc": accuracy * epoch / 2, "time_this_iter_s": 1.0}
            )
        states.append(
            TrialState(
                f"t{i}", "TERMINATED", {**space.base, "freeze": "head", "lr": lr, **overrides}
            )
        )
    states += [
        TrialState(f"u{i}", "TERMINATED", {**space.base, "freeze": "head", "lr": 1e-2, **overrides})
        for i in range(unscored)
    ]
    store.write_json("search.json", search_summary(space, ["a", "b"]))
    frame = tables.trials_frame(states)
    store.write_parquet("trials.parquet", frame)
    store.write_parquet("epochs.parquet", tables.epochs_frame())
    return store


def test_a_warm_started_search_starts_near_the_earlier_best(tmp_path, capsys):
    space = parse_space(
        {**SPACE, "space": {"freeze": {"choice": ["head"]}, "lr": {"loguniform": [1.0e-4, 1.0]}}},
        source="spaces/c.yaml",
    )
    lrs = list(np.geomspace(1e-4, 1.0, 30))
    store = earlier_search(
        tmp_path, space, lrs + [3.0], unscored=2
    )  # 3.0: outside this space's lr range
    trials = warm_start_trials(space, [store])
    assert len(trials) == 30 and capsys.readouterr().out.strip() == (
        f"warm start: 30 trial(s) of {store.uri()}; 1 outside this space skipped; "
        "2 stopped before a result skipped"
    )
    assert sorted(trial.value for trial in trials) == pytest.approx(
        sorted(0.8 - 0.2 * abs(math.log10(lr / 1e-2)) for lr in lrs)
    )
    assert trials[0].intermediate_values == {
        1: pytest.approx(trials[0].value / 2),
        2: trials[0].value,
    }

    def first_suggestions(warm, startup_trials=10):
        settings = dataclasses.replace(space.search, startup_trials=startup_trials)
        searcher, _ = _searcher(
            dataclasses.replace(space, search=settings),
            study=scratch_study(tmp_path),
            warm_start=warm,
        )
        return np.array([searcher.suggest(f"t{i}")["lr"] for i in range(8)])

    cold, warm = first_suggestions(None), first_suggestions(trials)
    assert not np.allclose(cold, warm)
    # The warm trials count towards TPE's random start: until the study holds startup_trials of
    # them it draws as the cold search does.
    assert np.allclose(first_suggestions(trials, startup_trials=40), cold)
    decades = lambda lrs: np.abs(np.log10(lrs / 1e-2))  # noqa: E731 - from the earlier best
    assert (decades(warm) < 0.5).all() and not (decades(cold) < 0.5).all(), (warm, cold)
    assert np.median(decades(warm)) < np.median(decades(cold))

    other = earlier_search(
        tmp_path, space, lrs, batch_size=64
    )  # another fixed setting: not comparable
    assert warm_start_trials(space, [other]) == []
    # Nothing skipped is said as well: the line names both reasons, always.
    assert capsys.readouterr().out.strip() == (
        f"warm start: 0 trial(s) of {other.uri()}; 30 outside this space skipped; "
        "0 stopped before a result skipped"
    )


def test_the_budget_stops_the_search_once_spent(tmp_path):
    space = space_with(
        search={"budget_gpu_hours": 2.0, "budget_hours": 10.0},
        resources={"workers": 2, "cpus_per_worker": 1, "gpus_per_worker": 1},
    )
    store = ResultsStore(str(tmp_path / "results"), "cond")
    store.write_json(
        "search.json", {"spent": {"hours": 1.0, "gpu_hours": 1.5}}
    )  # what an earlier run spent
    budget = Budget(space.search, space.resources, store)
    assert not budget.stop_all()
    full, head = {**space.base, "freeze": "none"}, {**space.base, "freeze": "head", "lr": 1e-2}
    budget(
        "a", {"config": head, "feature_cache": 1.0, "time_this_iter_s": 3600.0}
    )  # 0.125 GPU for an hour
    assert budget.spent()["gpu_hours"] == pytest.approx(1.625) and not budget.stop_all()
    budget(
        "b", {"config": full, "feature_cache": 0.0, "time_this_iter_s": 900.0}
    )  # 2 GPUs for a quarter of an hour
    assert budget.spent()["gpu_hours"] == pytest.approx(2.125) and budget.stop_all()
    assert ended_by(space.search, budget.spent()) == "budget_gpu_hours"
    assert ended_by(space.search, {"hours": 10.0, "gpu_hours": 0.0}) == "budget_hours"
    assert ended_by(space_with().search, {"hours": 1e6, "gpu_hours": 1e6}) is None  # no budget set
