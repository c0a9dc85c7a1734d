import pytest
import timm
import torch

from sketch_core.errors import SketchError
from sketch_core.models import check_pretrained_weights, create_classifier


def trainable(model):
    return {name for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("name", ["test_vit", "test_convnext", "test_resnet"])
def test_freeze_policies(name):
    everything = create_classifier(name, num_classes=5)
    head_only = create_classifier(name, num_classes=5, freeze="head")
    last_block = create_classifier(name, num_classes=5, freeze="last_n_blocks", trainable_blocks=1)
    assert trainable(head_only) == {n for n in trainable(everything) if n.startswith("head.")}
    assert trainable(head_only) < trainable(last_block) < trainable(everything)
    assert head_only(torch.zeros(2, 3, 32, 32)).shape == (2, 5)


def test_head_only_keeps_the_backbone_in_eval_mode():
    model = create_classifier(
        "test_vit", num_classes=3, freeze="head", head="mlp", head_hidden=16
    ).train()
    assert model.head.training and not model.backbone.training
    assert isinstance(model.head[0], torch.nn.Linear) and model.head[0].out_features == 16


def test_too_many_trainable_blocks():
    with pytest.raises(SketchError, match="trainable_blocks: .* has 4 blocks, got 9"):
        create_classifier("test_resnet", num_classes=3, freeze="last_n_blocks", trainable_blocks=9)


def test_unavailable_pretrained_weights_name_the_model_and_the_way_out(monkeypatch, tmp_path):
    import huggingface_hub.constants

    # huggingface_hub reads its environment once, at import: set what it read.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(SketchError) as caught:
        create_classifier("test_resnet.r160_in1k", num_classes=3, pretrained=True)
    message = str(caught.value)
    assert message.startswith("model test_resnet.r160_in1k: pretrained weights could not be loaded")
    assert "pretrained: false" in message and "checkpoint_file" in message and "HF_HOME" in message


def test_local_checkpoint_file_replaces_the_hub(tmp_path):
    source = create_classifier("test_resnet", num_classes=3)
    torch.save(source.backbone.state_dict(), tmp_path / "weights.pth")
    loaded = create_classifier(
        "test_resnet", num_classes=3, checkpoint_file=str(tmp_path / "weights.pth")
    )
    for name, tensor in source.backbone.state_dict().items():
        assert torch.equal(tensor, loaded.backbone.state_dict()[name]), name
    with pytest.raises(SketchError, match="checkpoint_file: .*missing.pth not found"):
        create_classifier(
            "test_resnet", num_classes=3, checkpoint_file=str(tmp_path / "missing.pth")
        )


def test_a_checkpoint_of_this_project_loads_as_a_backbone_without_its_head(tmp_path):
    """last.pt of python -m sketch_core.train holds backbone and head (and the optimiser): its
    backbone is what checkpoint_file loads; the head of the new run is its own."""
    from sketch_core.engine import save_checkpoint

    trained = create_classifier("test_resnet", num_classes=7, head="mlp", head_hidden=8)
    save_checkpoint(
        {"model": trained.state_dict(), "epoch": 3, "optimizer": {}}, tmp_path / "last.pt"
    )
    loaded = create_classifier(
        "test_resnet", num_classes=3, checkpoint_file=str(tmp_path / "last.pt")
    )
    for name, tensor in trained.backbone.state_dict().items():
        assert torch.equal(tensor, loaded.backbone.state_dict()[name]), name
    assert loaded.head[-1].out_features == 3


def test_weights_of_another_model_or_no_weights_are_one_line(tmp_path):
    torch.save(
        create_classifier("test_resnet", num_classes=3).backbone.state_dict(), tmp_path / "r.pth"
    )
    with pytest.raises(
        SketchError,
        match=r"^checkpoint_file: .*r.pth: not weights of test_vit: it lacks 78 of the model's "
        r"tensors \(first: cls_token\)",
    ):
        create_classifier("test_vit", num_classes=3, checkpoint_file=str(tmp_path / "r.pth"))
    (tmp_path / "notes.txt").write_text("not weights")
    with pytest.raises(
        SketchError, match=r"^checkpoint_file: .*notes.txt: not a readable weights file"
    ):
        create_classifier("test_resnet", num_classes=3, checkpoint_file=str(tmp_path / "notes.txt"))


def test_weights_are_checked_without_loading_them(monkeypatch, tmp_path):
    """The check tune.py and final_fit.py run before starting Ray: unreachable weights fail it with
    create_classifier's message; weights in a pre-filled Hugging Face cache pass it, offline, and
    load."""
    import huggingface_hub.constants
    from safetensors.torch import save_file

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(
        SketchError,
        match=r"^model test_resnet.r160_in1k: pretrained weights could not be fetched "
        r"\(OfflineModeIsEnabled.*pre-fill the Hugging Face cache",
    ):
        check_pretrained_weights("test_resnet.r160_in1k", pretrained=True)
    with pytest.raises(SketchError, match="checkpoint_file: .*missing.pth not found"):
        check_pretrained_weights(
            "test_resnet", pretrained=False, checkpoint_file=str(tmp_path / "missing.pth")
        )

    # The cache layout huggingface_hub writes: refs/main names the snapshot holding the files.
    repo = tmp_path / "hub" / "models--timm--test_resnet.r160_in1k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    (repo / "snapshots" / ("0" * 40)).mkdir(parents=True)
    weights = timm.create_model("test_resnet", num_classes=1000).state_dict()
    save_file(
        {name: tensor.contiguous() for name, tensor in weights.items()},
        str(repo / "snapshots" / ("0" * 40) / "model.safetensors"),
    )
    check_pretrained_weights("test_resnet.r160_in1k", pretrained=True)
    model = create_classifier("test_resnet.r160_in1k", num_classes=3, pretrained=True)
    assert torch.equal(model.backbone.conv1[0].weight, weights["conv1.0.weight"])


def test_the_shipped_backbone_loads_and_its_features_beat_a_random_one_by_far():
    """demo/: real sketches and test_resnet pretrained on other Quick, Draw! classes. A head on its
    frozen features learns the demo classes; on a random backbone's it stays near chance."""
    from conftest import SHIPPED_BACKBONE, SHIPPED_FINE_TUNE

    from sketch_core.config import TrainConfig
    from sketch_core.engine import TrainingRun
    from sketch_core.models import create_backbone

    loaded = create_backbone("test_resnet", pretrained=False, checkpoint_file=str(SHIPPED_BACKBONE))
    fresh = timm.create_model("test_resnet", num_classes=0).state_dict()
    assert loaded.state_dict().keys() == fresh.keys()
    assert not any(
        torch.equal(tensor, fresh[name])
        for name, tensor in loaded.state_dict().items()
        if tensor.is_floating_point() and tensor.numel() > 1
    )  # every weight pretrained
    head_only = {**SHIPPED_FINE_TUNE, "freeze": "head", "lr": 1e-2, "epochs": 5}
    pretrained = max(m["val_acc"] for m in TrainingRun(TrainConfig.from_dict(head_only)).epochs())
    random = max(
        m["val_acc"]
        for m in TrainingRun(TrainConfig.from_dict({**head_only, "checkpoint_file": ""})).epochs()
    )
    assert pretrained > 0.75 and random < 0.25, (pretrained, random)  # 24 classes: chance is 0.04
