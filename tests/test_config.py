import pytest
import yaml

from ray_jobs.space import parse_space
from sketch_core.config import TrainConfig
from sketch_core.errors import SketchError


def test_yaml_scalars_are_typed():
    config = TrainConfig.from_dict(
        {"lr": "1e-3", "epochs": 3.0, "ema": "true", "model": "test_vit"}
    )
    assert config.lr == 0.001 and config.epochs == 3 and config.ema is True


@pytest.mark.parametrize(
    "values, message",
    [
        ({"lrr": 0.1}, "lrr: unknown key (did you mean 'lr'?)"),
        ({"lr": -0.1}, "lr: expected a value > 0.0, got -0.1"),
        ({"lr": 0}, "lr: expected a value > 0.0"),
        ({"augment": "wild"}, "augment: expected one of none, light, sketch, heavy, got 'wild'"),
        ({"resize": "crop"}, "resize: expected one of letterbox, stretch, got 'crop'"),
        ({"freeze": "some"}, "freeze: expected one of none, head, last_n_blocks"),
        ({"epochs": "three"}, "epochs: expected int, got 'three'"),
        (
            {"batch_size": 7, "mixup_alpha": 0.2},
            "batch_size: Mixup/CutMix needs an even batch size",
        ),
        ({"folds": 1}, "folds: expected 0 (no folds) or at least 2"),
        ({"folds": 3, "fold": 3}, "fold: expected 0..2"),
        ({"val_fraction": 1.5}, "val_fraction: expected a value <= 0.9"),
    ],
)
def test_bad_values_are_one_line_naming_the_field(values, message):
    with pytest.raises(SketchError) as caught:
        TrainConfig.from_dict(values, source="space.yaml")
    text = str(caught.value)
    assert text.startswith("space.yaml: ") and message in text and "\n" not in text


def test_validation_leaves_the_model_name_to_where_a_model_is_chosen_and_does_not_import_timm():
    import subprocess
    import sys

    probe = (
        "import sys; from sketch_core.config import TrainConfig; "
        "TrainConfig.from_dict({'model': 'not_a_timm_model', 'lr': '1e-3'}); "
        "print('timm' in sys.modules)"
    )
    assert (
        subprocess.run(
            [sys.executable, "-c", probe], capture_output=True, text=True, check=True
        ).stdout.strip()
        == "False"
    )
    from sketch_core.models import check_model_name

    with pytest.raises(
        SketchError, match="^space.yaml: model: unknown timm model 'not_a_timm_model'"
    ):
        check_model_name("not_a_timm_model", "space.yaml")


def test_a_space_file_and_the_train_config_read_untyped_values_alike():
    """One coercion for both: YAML text, JSON whole floats, yes/no words."""
    document = {
        "experiment": "e",
        "model": {"name": "test_resnet"},
        "data": {"demo": "yes"},
        "search": {"num_samples": 4.0, "budget_hours": "1e-1"},
        "fixed": {"ema": "yes", "batch_size": 8.0, "lr": "1e-3"},
    }
    space = parse_space(document, source="space.yaml")
    assert (
        space.data.demo is True
        and space.search.num_samples == 4
        and space.search.budget_hours == 0.1
    )
    assert space.base["ema"] is True and space.base["lr"] == 0.001 and space.base["batch_size"] == 8
    for section, key in (("search", "num_samples"), ("fixed", "batch_size")):
        with pytest.raises(
            SketchError,
            match=f"space.yaml: {section}.{key}: expected int, got True|"
            f"space.yaml: {key}: expected int, got True",
        ):
            parse_space(
                {**document, section: {**document[section], key: True}}, source="space.yaml"
            )


def test_replace_revalidates():
    with pytest.raises(SketchError, match="epochs"):
        TrainConfig().replace(epochs=0)


def test_resize_defaults_to_letterbox_and_is_searchable():
    assert TrainConfig().resize == "letterbox"
    document = yaml.safe_load("""
        experiment: resize
        model: {name: test_resnet, image_size: 32}
        space: {resize: {choice: [letterbox, stretch]}}""")
    space = parse_space(document, source="space.yaml")
    assert (
        "resize" in space.params
        and "resize" in space.param_space()
        and space.base["resize"] == "letterbox"
    )
    fixed = parse_space(
        {**document, "space": {}, "fixed": {"resize": "stretch"}}, source="space.yaml"
    )
    assert fixed.base["resize"] == "stretch"
    with pytest.raises(
        SketchError, match="space.resize.*expected one of letterbox, stretch, got 'crop'"
    ):
        parse_space(
            {**document, "space": {"resize": {"choice": ["letterbox", "crop"]}}},
            source="space.yaml",
        )
