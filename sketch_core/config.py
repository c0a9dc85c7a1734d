"""The typed configuration of one training run.

One flat ``TrainConfig`` flows unchanged from a search-space YAML (fixed values plus one sample
of the searched ones) through Ray into the train loop, so every name a user can search over is a
field here. ``TrainConfig.from_dict`` is the only way in from untyped data: it rejects unknown
keys and impossible values with one line that names the field (``sketch_core.settings``). It does
not import timm: whether ``model`` names a timm model is checked where a model is chosen (the
space file, the command line) or built (``models.check_model_name``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from sketch_core.errors import SketchError
from sketch_core.settings import check_keys, from_mapping
from sketch_core.settings import spec as _spec

AUGMENTATIONS = ("none", "light", "sketch", "heavy")
RESIZE_POLICIES = ("letterbox", "stretch")
FREEZE_POLICIES = ("none", "head", "last_n_blocks")
HEAD_TYPES = ("linear", "mlp")
OPTIMIZERS = ("adamw", "sgd")
LR_SCHEDULES = ("cosine", "step")
# Test-time augmentation by default wherever a model predicts (the original and its horizontal
# flip averaged; flipped near-duplicates exist in the real data): TrainingRun.predict,
# sketch_core.train --predict and final_fit.py.
TTA = True


@dataclass(frozen=True)
class TrainConfig:
    # Data
    data_dir: str = field(default="", metadata=_spec(help="competition-layout data folder"))
    val_fraction: float = field(default=0.2, metadata=_spec(low=0.0, high=0.9))
    folds: int = field(
        default=0, metadata=_spec(low=0, help="0: a val_fraction split; K>=2: K folds")
    )
    fold: int = field(default=0, metadata=_spec(low=0))
    image_size: int = field(default=224, metadata=_spec(low=16))
    resize: str = field(
        default="letterbox",
        metadata=_spec(choices=RESIZE_POLICIES, help="to the square: pad with white, or stretch"),
    )
    augment: str = field(default="sketch", metadata=_spec(choices=AUGMENTATIONS))
    num_workers: int = field(default=2, metadata=_spec(low=0, help="data loader processes"))
    decode_cache: bool = True
    # Near-duplicates (a mirror, a rotated or re-encoded copy) on one side of the split and of every
    # fold, so val_acc is not inflated by copies of training images (sketch_core.duplicates).
    group_duplicates: bool = True
    # Model
    model: str = "test_vit"
    pretrained: bool = False
    checkpoint_file: str = field(
        default="", metadata=_spec(help="local weights instead of the hub")
    )
    drop_path_rate: float = field(default=0.0, metadata=_spec(low=0.0, high=0.9))
    freeze: str = field(default="none", metadata=_spec(choices=FREEZE_POLICIES))
    trainable_blocks: int = field(default=2, metadata=_spec(low=1, help="with last_n_blocks"))
    head: str = field(default="linear", metadata=_spec(choices=HEAD_TYPES))
    head_hidden: int = field(default=512, metadata=_spec(low=1))
    head_dropout: float = field(default=0.0, metadata=_spec(low=0.0, high=0.95))
    # Optimisation
    epochs: int = field(default=5, metadata=_spec(low=1))
    batch_size: int = field(default=32, metadata=_spec(low=1, help="per worker"))
    lr: float = field(default=1e-3, metadata=_spec(low=0.0, low_open=True))
    weight_decay: float = field(default=0.05, metadata=_spec(low=0.0))
    optimizer: str = field(default="adamw", metadata=_spec(choices=OPTIMIZERS))
    momentum: float = field(default=0.9, metadata=_spec(low=0.0, high=1.0))
    lr_schedule: str = field(default="cosine", metadata=_spec(choices=LR_SCHEDULES))
    warmup_epochs: float = field(default=0.0, metadata=_spec(low=0.0))
    decay_epochs: float = field(default=2.0, metadata=_spec(low=0.0, low_open=True))
    decay_rate: float = field(default=0.1, metadata=_spec(low=0.0, high=1.0, low_open=True))
    min_lr: float = field(default=0.0, metadata=_spec(low=0.0))
    label_smoothing: float = field(default=0.1, metadata=_spec(low=0.0, high=0.99))
    mixup_alpha: float = field(default=0.0, metadata=_spec(low=0.0))
    cutmix_alpha: float = field(default=0.0, metadata=_spec(low=0.0))
    mixup_prob: float = field(default=1.0, metadata=_spec(low=0.0, high=1.0))
    grad_accum_steps: int = field(default=1, metadata=_spec(low=1))
    grad_clip: float = field(default=0.0, metadata=_spec(low=0.0, help="0: no clipping"))
    ema: bool = False
    ema_decay: float = field(default=0.999, metadata=_spec(low=0.0, high=1.0, low_open=True))
    # timm's EMA warm-up: the decay grows with the optimiser steps (1 - (1 + step)^-2/3, capped at
    # ema_decay), so the average follows a short run instead of keeping its initial weights.
    ema_warmup: bool = True
    ema_eval: bool = field(
        default=True,
        metadata=_spec(
            help="with ema: validate, keep and predict with the average (false: the raw "
            "weights); both val_acc are reported"
        ),
    )
    seed: int = 0
    # Device
    amp: bool = field(default=True, metadata=_spec(help="bf16 autocast on CUDA; ignored on CPU"))
    channels_last: bool = False
    compile: bool = False
    feature_cache: bool = field(
        default=True, metadata=_spec(help="head-only: train on cached features")
    )
    feature_views: int = field(
        default=4, metadata=_spec(low=1, help="feature cache: augmented views per image")
    )

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], *, source: str = "config") -> TrainConfig:
        """Build and validate a config; ``source`` names where the values came from in errors."""
        config = from_mapping(cls, values, source=source)
        config.validate(source)
        return config

    @classmethod
    def check_keys(cls, keys, source: str = "config") -> None:
        check_keys(cls, keys, source=source)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> TrainConfig:
        return TrainConfig.from_dict({**self.to_dict(), **changes})

    def validate(self, source: str = "config") -> None:
        """The checks that involve several fields (each field's own range: ``from_mapping``)."""
        if self.folds == 1:
            raise SketchError(f"{source}: folds: expected 0 (no folds) or at least 2, got 1")
        if self.folds and self.fold >= self.folds:
            raise SketchError(
                f"{source}: fold: expected 0..{self.folds - 1} with folds={self.folds}, "
                f"got {self.fold}"
            )
        if (self.mixup_alpha > 0 or self.cutmix_alpha > 0) and self.batch_size % 2:
            raise SketchError(
                f"{source}: batch_size: Mixup/CutMix needs an even batch size, "
                f"got {self.batch_size}"
            )
        if self.warmup_epochs >= self.epochs and self.warmup_epochs > 0:
            raise SketchError(
                f"{source}: warmup_epochs: expected fewer than epochs ({self.epochs}), "
                f"got {self.warmup_epochs}"
            )

    @property
    def uses_mixup(self) -> bool:
        return (self.mixup_alpha > 0 or self.cutmix_alpha > 0) and self.mixup_prob > 0

    @property
    def uses_feature_cache(self) -> bool:
        """Whether the head trains on cached backbone features rather than images
        (``sketch_core.features``). Mixup/CutMix blend images (CutMix pastes patches): the features
        of a blended image are not a blend of features, so the cache cannot reproduce them."""
        return self.freeze == "head" and self.feature_cache and not self.uses_mixup
