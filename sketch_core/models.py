"""timm backbones with a replaceable head and a freeze policy."""

from __future__ import annotations

from pathlib import Path

import timm
import torch
from timm.models import group_parameters, is_model
from torch import nn

from sketch_core.errors import SketchError


class SketchClassifier(nn.Module):
    """A timm backbone (pooled features, no classifier) followed by our head.

    Under the ``head`` freeze policy the backbone stays in eval mode even while training, so its
    features are a fixed function of the image: the feature cache relies on that.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, freeze: str):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.freeze = freeze

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images))

    def train(self, mode: bool = True) -> SketchClassifier:
        super().train(mode)
        if self.freeze == "head":
            self.backbone.eval()
        return self


def check_model_name(name: str, source: str = "config") -> None:
    if not is_model(name):
        close = timm.list_models(f"*{name.split('.')[0][:6]}*")[:3]
        hint = f" (similar: {', '.join(close)})" if close else ""
        raise SketchError(f"{source}: model: unknown timm model {name!r}{hint}")


def create_classifier(
    name: str,
    *,
    num_classes: int,
    pretrained: bool = False,
    checkpoint_file: str = "",
    drop_path_rate: float = 0.0,
    head: str = "linear",
    head_hidden: int = 512,
    head_dropout: float = 0.0,
    freeze: str = "none",
    trainable_blocks: int = 2,
    seed: int | None = None,
    backbone: nn.Module | None = None,
) -> SketchClassifier:
    """Build ``name`` from timm with a ``head`` of ``num_classes`` outputs and apply ``freeze``.

    ``seed``: the head's initial weights, drawn from it whether or not the backbone is built here.
    ``backbone``: one built earlier by ``create_backbone`` with these arguments, used instead of a
    new one (a process keeps a frozen backbone for its next head-only run).
    """
    check_model_name(name)
    if backbone is None:
        backbone = create_backbone(
            name,
            pretrained=pretrained,
            checkpoint_file=checkpoint_file,
            drop_path_rate=drop_path_rate,
        )
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        classifier_head = _create_head(
            head, backbone.num_features, num_classes, head_hidden, head_dropout
        )
    model = SketchClassifier(backbone, classifier_head, freeze)
    apply_freeze(model, freeze, trainable_blocks)
    return model


def data_config(model: SketchClassifier) -> dict:
    """The normalisation the backbone was pretrained with (mean, std as 0..1 tuples)."""
    return timm.data.resolve_data_config({}, model=model.backbone)


def apply_freeze(model: SketchClassifier, policy: str, trainable_blocks: int = 2) -> None:
    """``none``: train everything; ``head``: only the head; ``last_n_blocks``: the head, the last
    ``trainable_blocks`` blocks and the norm layers after them (as timm groups the model's
    layers)."""
    model.backbone.requires_grad_(policy == "none")
    model.head.requires_grad_(True)
    if policy != "last_n_blocks":
        return
    groups = group_parameters(model.backbone, model.backbone.group_matcher(coarse=True))
    ordered = [groups[key] for key in sorted(groups)]
    parameters = dict(model.backbone.named_parameters())
    # Trailing groups of 1-D parameters only (final norms) belong with the head.
    while ordered and all(parameters[n].ndim == 1 for n in ordered[-1]):
        for param_name in ordered.pop():
            parameters[param_name].requires_grad_(True)
    blocks = ordered[1:]  # group 0 is the stem
    if trainable_blocks > len(blocks):
        raise SketchError(
            f"trainable_blocks: {model.backbone.__class__.__name__} has {len(blocks)} blocks, "
            f"got {trainable_blocks}"
        )
    for group in blocks[len(blocks) - trainable_blocks :]:
        for param_name in group:
            parameters[param_name].requires_grad_(True)


def create_backbone(
    name: str, *, pretrained: bool, checkpoint_file: str = "", drop_path_rate: float = 0.0
) -> nn.Module:
    """timm's ``name`` without its classifier (pooled features), with timm's pretrained weights or
    those of ``checkpoint_file`` (``checkpoint_weights``)."""
    kwargs = {"num_classes": 0}
    if drop_path_rate:
        kwargs["drop_path_rate"] = drop_path_rate
    weights = checkpoint_weights(checkpoint_file) if checkpoint_file else None
    try:
        backbone = timm.create_model(name, pretrained=pretrained and weights is None, **kwargs)
    except (OSError, RuntimeError, ValueError) as exc:
        if not pretrained:
            raise
        raise _weights_error(name, "could not be loaded", exc) from None
    if weights is not None:
        load_backbone_weights(backbone, weights, name=name, source=checkpoint_file)
    return backbone


def checkpoint_weights(checkpoint_file: str) -> dict[str, torch.Tensor]:
    """The backbone weights in a local file: a timm model's state dict (a .safetensors or torch
    file, as on the hub; nested under ``state_dict`` or ``model`` as training scripts save it), or a
    checkpoint of this project's (``python -m sketch_core.train``'s last.pt, a refit's weights),
    whose head is left out. Loaded weights-only."""
    _require_checkpoint_file(checkpoint_file)
    try:
        state = timm.models.load_state_dict(checkpoint_file, use_ema=False, weights_only=True)
    except Exception as exc:  # torch and safetensors raise several types for a foreign file
        raise SketchError(
            f"checkpoint_file: {checkpoint_file}: not a readable weights file "
            f"({type(exc).__name__})"
        ) from None
    if any(key.startswith("backbone.") for key in state):  # a SketchClassifier: backbone and head
        return {
            key.removeprefix("backbone."): value
            for key, value in state.items()
            if key.startswith("backbone.")
        }
    return state


def load_backbone_weights(
    backbone: nn.Module, weights: dict[str, torch.Tensor], *, name: str, source: str
) -> None:
    """Load ``weights`` into ``backbone`` (timm's ``name`` with no classifier): every tensor of the
    backbone must be there with its shape; the classifier's weights, if any, are left out."""
    classifier = backbone.pretrained_cfg.get("classifier") or ()
    for prefix in (classifier,) if isinstance(classifier, str) else classifier:
        for suffix in (".weight", ".bias"):
            weights.pop(prefix + suffix, None)
    expected = backbone.state_dict()
    missing = [key for key in expected if key not in weights]
    unexpected = [key for key in weights if key not in expected]
    wrong_shape = [
        key for key in expected if key in weights and weights[key].shape != expected[key].shape
    ]
    for problem, keys in (
        ("lacks", missing),
        ("has unknown", unexpected),
        ("has other shapes of", wrong_shape),
    ):
        if keys:
            raise SketchError(
                f"checkpoint_file: {source}: not weights of {name}: it {problem} {len(keys)} of "
                f"the model's tensors (first: {keys[0]}); expected a {name} state dict with "
                "timm's names, or a checkpoint of python -m sketch_core.train of this model"
            )
    backbone.load_state_dict(weights)


def check_pretrained_weights(name: str, *, pretrained: bool, checkpoint_file: str = "") -> None:
    """Raise the error ``create_classifier`` would for these arguments' weights, without loading
    anything: they must be in the local cache or reachable on the hub. A search checks this before
    it starts its cluster, instead of every trial failing on it (EVA02-L's weights are 1.2 GB)."""
    from huggingface_hub import file_exists, try_to_load_from_cache

    from sketch_core.timm_internals import pretrained_source

    if checkpoint_file:
        _require_checkpoint_file(checkpoint_file)
        return
    if not pretrained:
        return
    source, location = pretrained_source(name)
    if (
        source != "hf-hub"
    ):  # a URL or file timm fetches itself: nothing cheaper to check than loading it
        if not source:
            raise _weights_error(
                name, "do not exist", "timm has no pretrained weights for this name"
            )
        return
    repo_id, revision, filenames = location.repo_id, location.revision, location.filenames
    if any(
        isinstance(try_to_load_from_cache(repo_id, filename, revision=revision), str)
        for filename in filenames
    ):
        return
    try:
        if any(file_exists(repo_id, filename, revision=revision) for filename in filenames):
            return
    except Exception as exc:  # offline, no network, hub errors: all mean the same to the user
        raise _weights_error(name, "could not be fetched", exc) from None
    raise _weights_error(
        name, "could not be fetched", f"none of {', '.join(filenames)} in {repo_id}"
    )


def _require_checkpoint_file(checkpoint_file: str) -> None:
    if not Path(checkpoint_file).is_file():
        raise SketchError(f"checkpoint_file: {checkpoint_file} not found")


def _weights_error(name: str, what: str, cause: Exception | str) -> SketchError:
    reason = (
        f"{type(cause).__name__}: {str(cause).splitlines()[0][:160]}"
        if isinstance(cause, Exception)
        else cause
    )
    return SketchError(
        f"model {name}: pretrained weights {what} ({reason}); set pretrained: false, point "
        "checkpoint_file at a local weights file, or pre-fill the Hugging Face cache (HF_HOME) "
        "on every node"
    )


def _create_head(
    kind: str, in_features: int, num_classes: int, hidden: int, dropout: float
) -> nn.Module:
    if kind == "linear":
        return nn.Sequential(nn.Dropout(dropout), nn.Linear(in_features, num_classes))
    return nn.Sequential(
        nn.Linear(in_features, hidden),
        nn.GELU(),
        nn.Dropout(dropout),
        nn.Linear(hidden, num_classes),
    )
