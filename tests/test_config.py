import pytest
import yaml

from ray_jobs.space import parse_space
from sketch_core.config import TrainConfig
from sketch_core.errors import SketchError


def test_yaml_scalars_are_typed():
    config = TrainConfig.from_dict({"lr": "1e-3", "epochs": 3.0, "ema": "true", "model": "test_vit"})
    assert config.lr == 0.001 and config.epochs == 3 and config.ema is True


@pytest.mark.parametrize("values, message", [
    ({"lrr": 0.1}, "unknown key 'lrr' (did you mean 'lr'?)"),
    ({"lr": -0.1}, "lr: expected a value > 0.0, got -0.1"),
    ({"lr": 0}, "lr: expected a value > 0.0"),
    ({"augment": "wild"}, "augment: expected one of none, light, sketch, heavy, got 'wild'"),
    ({"resize": "crop"}, "resize: expected one of letterbox, stretch, got 'crop'"),
    ({"freeze": "some"}, "freeze: expected one of none, head, last_n_blocks"),
    ({"model": "not_a_timm_model"}, "model: unknown timm model 'not_a_timm_model'"),
    ({"epochs": "three"}, "epochs: expected int, got 'three'"),
    ({"batch_size": 7, "mixup_alpha": 0.2}, "batch_size: Mixup/CutMix needs an even batch size"),
    ({"folds": 1}, "folds: expected 0 (no folds) or at least 2"),
    ({"folds": 3, "fold": 3}, "fold: expected 0..2"),
    ({"val_fraction": 1.5}, "val_fraction: expected a value <= 0.9"),
])
def test_bad_values_are_one_line_naming_the_field(values, message):
    with pytest.raises(SketchError) as caught:
        TrainConfig.from_dict(values, source="space.yaml")
    text = str(caught.value)
    assert text.startswith("space.yaml: ") and message in text and "\n" not in text


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
    assert "resize" in space.params and "resize" in space.param_space() and space.base["resize"] == "letterbox"
    fixed = parse_space({**document, "space": {}, "fixed": {"resize": "stretch"}}, source="space.yaml")
    assert fixed.base["resize"] == "stretch"
    with pytest.raises(SketchError, match="space.resize.*expected one of letterbox, stretch, got 'crop'"):
        parse_space({**document, "space": {"resize": {"choice": ["letterbox", "crop"]}}}, source="space.yaml")
