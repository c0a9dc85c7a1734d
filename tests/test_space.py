"""Search-space files: the shipped ones load, and every invalid case is one line naming the
field."""

import copy
from pathlib import Path

import pytest
from conftest import scratch_study

from ray_jobs.space import Resources, load_space, parse_space, runs_in_trial_process
from sketch_core.errors import SketchError

SPACES = Path(__file__).resolve().parents[1] / "search_spaces"
# A space with every section, as the demo's was: the tests below change one field of it each.
DEMO = {
    "experiment": "demo",
    "data": {"dir": "data/demo", "demo": True},
    "model": {"name": "test_resnet", "pretrained": False, "image_size": 48},
    "resources": {"workers": 2, "cpus_per_worker": 0.9, "gpus_per_worker": 0, "head_cpus": 1},
    "search": {
        "searcher": "optuna",
        "num_samples": 4,
        "max_concurrent": 1,
        "metric": "val_acc",
        "mode": "max",
        "seed": 2,
        "max_failures": 2,
        "keep_checkpoints": 2,
    },
    "scheduler": {"type": "asha", "max_epochs": 6, "grace_period": 2, "reduction_factor": 2},
    "fixed": {
        "batch_size": 16,
        "val_fraction": 0.2,
        "weight_decay": 0.01,
        "num_workers": 0,
        "lr_schedule": "cosine",
    },
    "space": {
        "freeze": {"choice": ["head", "none"]},
        "lr": [
            {"when": {"freeze": "head"}, "loguniform": [0.003, 0.03]},
            {"loguniform": [0.001, 0.02]},
        ],
        "augment": {"choice": ["none", "light", "sketch"]},
        "label_smoothing": {"uniform": [0.0, 0.2]},
        "head": {"choice": ["linear", "mlp"]},
    },
}


@pytest.mark.parametrize(
    "name", ["demo.yaml", "eva02.yaml", "convnext.yaml", "demo_head.yaml", "eva02_head.yaml"]
)
def test_shipped_spaces_load(name):
    space = load_space(SPACES / name)
    assert space.params and space.base["epochs"] == space.scheduler.max_epochs
    assert set(space.param_space()) >= set(space.base)


def test_eva02_is_the_real_search(tmp_path):
    from ray_jobs.tuning import _searcher

    space = load_space(SPACES / "eva02.yaml")
    assert space.base["model"] == "eva02_large_patch14_448.mim_m38m_ft_in22k_in1k"
    assert space.base["pretrained"] is True and space.base["image_size"] == 448
    assert space.resources.workers == 4 and space.resources.gpus_per_worker == 1
    assert {
        "lr",
        "freeze",
        "head",
        "weight_decay",
        "label_smoothing",
        "augment",
        "mixup_alpha",
        "batch_size",
    } <= set(space.params.names)
    assert space.search.budget_gpu_hours == 40 and space.start_from[0]["freeze"] == "head"
    # A recipe per freeze value: every head-only trial trains on cached features, at a head's rates.
    searcher, _ = _searcher(space, study=scratch_study(tmp_path))
    drawn = [{**space.base, **searcher.suggest(f"t{i}")} for i in range(30)]
    assert drawn[0] == {**space.base, **space.start_from[0]}
    assert {config["freeze"] for config in drawn} == {"head", "last_n_blocks", "none"}
    for config in drawn:
        head = config["freeze"] == "head"
        assert runs_in_trial_process(config) == head
        assert (3e-4 <= config["lr"] <= 3e-3) if head else config["lr"] <= 3e-4


def test_head_spaces_train_every_trial_in_its_tune_process_with_a_gpu_share():
    """Each trial of the head-only spaces runs in a Tune trial process (no TorchTrainer), holding
    head_cpus and head_gpus; a mixed space's fine-tuning trials hold their workers'."""
    for name, gpus in (("eva02_head.yaml", 0.125), ("demo_head.yaml", 0)):
        space = load_space(SPACES / name)
        for bound in (0, -1):  # the ends of every searched range, and each option
            config = {
                **space.base,
                **{
                    param.name: param.branches[0].distribution.bounds()[bound]
                    for param in space.params
                },
            }
            assert runs_in_trial_process(config)
            assert space.resources.of_trial(config) == {
                "CPU": 1.0,
                **({"GPU": gpus} if gpus else {}),
            }
    mixed = load_space(SPACES / "eva02.yaml")
    assert mixed.resources.head_gpus == Resources.HEAD_GPUS  # the default where workers have GPUs
    head_only = {**mixed.base, "freeze": "head", "mixup_alpha": 0.0, "cutmix_alpha": 0.0}
    assert mixed.resources.of_trial(head_only) == {"CPU": 1.0, "GPU": Resources.HEAD_GPUS}
    assert mixed.resources.of_trial({**head_only, "freeze": "none"}) == {"CPU": 40.05, "GPU": 4.0}
    assert not runs_in_trial_process({**head_only, "mixup_alpha": 0.2})  # Mixup trains on images
    assert load_space(SPACES / "demo.yaml").resources.head_gpus == 0


def changed(path: str, value):
    document = copy.deepcopy(DEMO)
    *parents, last = path.split(".")
    target = document
    for key in parents:
        target = target.setdefault(key, {})
    if value is None:
        del target[last]
    else:
        target[last] = value
    return document


@pytest.mark.parametrize(
    "path, value, message",
    [
        ("bogus", 1, "bogus: unknown key"),
        ("search.sercher", "optuna", "search.sercher: unknown key"),
        ("experiment", None, "experiment: a name is required"),
        ("experiment", "../up", "experiment: expected a folder name"),
        ("model.name", "no_such_net", "model: unknown timm model 'no_such_net'"),
        ("space.lr", {"lognormal": [1, 2]}, "space.lr: unknown distribution 'lognormal'"),
        (
            "space.lr",
            {"loguniform": [0.1, 0.01]},
            "space.lr: loguniform: low (0.1) must be below high (0.01)",
        ),
        ("space.lr", {"loguniform": [0, 0.01]}, "space.lr: loguniform: bounds must be > 0"),
        ("space.lr", {"uniform": [0.1]}, "space.lr: uniform: expected [low, high]"),
        ("space.lr", {"uniform": [-1.0, 0.1]}, "space.lr: lr: expected a value > 0.0, got -1.0"),
        (
            "space.augment",
            {"choice": ["light", "psychedelic"]},
            "space.augment: augment: expected one of",
        ),
        ("space.learning_rate", {"uniform": [0.1, 0.2]}, "space: learning_rate: unknown key"),
        (
            "space.epochs",
            {"choice": [1, 2]},
            "space.epochs: cannot be searched here; set scheduler.max_epochs",
        ),
        (
            "space.model",
            {"choice": ["test_vit"]},
            "space.model: cannot be searched here; set model.name: {choice: [...]}",
        ),
        ("fixed.epochs", 3, "fixed.epochs: set it as scheduler.max_epochs instead"),
        ("fixed.lr", 0.1, "space.lr: also set in fixed"),
        ("fixed.optimizer", "lion", "optimizer: expected one of adamw, sgd"),
        ("search.searcher", "bayes", "search.searcher: expected one of optuna, random, grid"),
        (
            "search.metric",
            "accuracy",
            "search.metric: expected one of val_acc, val_loss, train_loss",
        ),
        ("search.mode", "min", "search.mode: val_acc is best at max"),
        ("search.num_samples", 0, "search.num_samples: expected a value >= 1, got 0"),
        ("search.startup_trials", -1, "search.startup_trials: expected a value >= 0, got -1"),
        ("scheduler.grace_period", 10, "scheduler.grace_period: expected 1..max_epochs (6)"),
        ("scheduler.reduction_factor", 1, "scheduler.reduction_factor: expected a value > 1"),
        ("resources.workers", 0, "resources.workers: expected a value >= 1, got 0"),
        ("resources.head_cpus", 0, "resources.head_cpus: expected a value > 0.0, got 0.0"),
        ("resources.head_gpus", -0.5, "resources.head_gpus: expected a value >= 0.0, got -0.5"),
        ("resources.gpus_per_worker", "one", "resources.gpus_per_worker: expected float"),
        (
            "space.head",
            {"grid": ["linear", "mlp"]},
            "space: grid values need search.searcher grid or random",
        ),
    ],
)
def test_invalid_spaces_are_one_line(path, value, message):
    with pytest.raises(SketchError) as caught:
        parse_space(changed(path, value), source="spaces/x.yaml")
    text = str(caught.value)
    assert text.startswith("spaces/x.yaml") and message in text and "\n" not in text


def test_grid_searcher_turns_choices_into_a_grid(tmp_path):
    from ray_jobs.tuning import _searcher

    document = changed("search.searcher", "grid") | {
        "space": {"head": {"choice": ["linear", "mlp"]}, "lr": {"grid": [0.1, 0.01]}}
    }
    document["search"]["num_samples"] = 2  # the grid twice
    space = parse_space(document, source="x.yaml")
    assert [b.distribution.kind for p in space.params for b in p.branches] == ["grid", "grid"]
    generator, trials = _searcher(space, study=scratch_study(tmp_path))
    assert trials == 8 and generator.trials == 2 * [
        {"head": "linear", "lr": 0.1},
        {"head": "linear", "lr": 0.01},
        {"head": "mlp", "lr": 0.1},
        {"head": "mlp", "lr": 0.01},
    ]


@pytest.mark.parametrize("searcher", ["optuna", "random", "grid"])
def test_every_searcher_keeps_max_concurrent(searcher, tmp_path):
    """The search's Tuner runs search.max_concurrent trials at once (or --max-concurrent's), with
    each searcher: Tune applies max_concurrent_trials to a Searcher only, which each of them is.
    (The quickstart's search is checked to run one trial at a time in test_tune_e2e.)"""
    from ray.tune.search import Searcher

    from ray_jobs.tuning import search_config

    document = changed("search.max_concurrent", 3)
    document["search"]["searcher"] = searcher
    document["space"] = {"head": {"choice": ["linear", "mlp"]}}  # a grid takes choices only
    space = parse_space(document, source="x.yaml")
    for settings, expected in ((space, 3), (space.with_overrides(max_concurrent=5), 5)):
        config = search_config(settings, study=scratch_study(tmp_path))
        assert config.max_concurrent_trials == settings.search.max_concurrent == expected
        assert isinstance(config.search_alg, Searcher), config.search_alg
        assert config.num_samples == (8 if searcher == "grid" else 4)  # the grid of 2, 4 times


def test_files_that_are_not_spaces(tmp_path):
    with pytest.raises(SketchError, match="search-space file not found"):
        load_space(tmp_path / "missing.yaml")
    (tmp_path / "broken.yaml").write_text("experiment: [unclosed\n")
    with pytest.raises(SketchError, match=r"broken.yaml: not valid YAML at line \d"):
        load_space(tmp_path / "broken.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(SketchError, match="list.yaml: expected a mapping"):
        load_space(tmp_path / "list.yaml")


def test_command_line_overrides():
    space = parse_space(DEMO, source="demo.yaml").with_overrides(
        experiment="other", num_samples=3, data_dir="/data/x"
    )
    assert space.experiment == "other" and space.search.num_samples == 3
    assert space.base["data_dir"] == "/data/x" and space.data.demo is False
    with pytest.raises(SketchError, match="--max-concurrent: expected at least 1, got 0"):
        space.with_overrides(max_concurrent=0)
