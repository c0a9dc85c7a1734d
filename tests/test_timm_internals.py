"""What sketch_core/timm_internals.py asks of timm's private helpers: fails when a timm upgrade
changes where a model's pretrained weights are looked for."""

from sketch_core.timm_internals import HubWeights, pretrained_source


def test_hub_weights_are_resolved_to_the_repository_and_the_files_timm_tries():
    source, weights = pretrained_source("eva02_large_patch14_448.mim_m38m_ft_in22k_in1k")
    assert source == "hf-hub"
    assert weights == HubWeights(
        "timm/eva02_large_patch14_448.mim_m38m_ft_in22k_in1k",
        None,
        ("model.safetensors", "pytorch_model.bin"),
    )
    # The default tag of a name without one, as timm.create_model(pretrained=True) loads it.
    assert pretrained_source("resnet18")[1].repo_id == "timm/resnet18.a1_in1k"


def test_a_name_without_pretrained_weights_has_no_source():
    assert pretrained_source("botnet50ts_256") == ("", None)  # timm registers it untrained
