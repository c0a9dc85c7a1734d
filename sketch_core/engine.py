"""The train loop: one ``TrainingRun`` per configuration, driven epoch by epoch.

The same code runs in one process and under ``torch.distributed`` (one process per GPU, as Ray
Train starts them): when a process group is initialised, the model is wrapped in DDP, training
data is sharded by a ``DistributedSampler``, validation is sharded without padding and every
metric is summed across ranks, so all ranks report the same numbers.
"""

from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from timm.data import Mixup
from timm.data.loader import PrefetchLoader, fast_collate
from timm.loss import SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, Subset

from sketch_core.config import TTA, TrainConfig
from sketch_core.data import TrainTable, read_train_table, split_indices
from sketch_core.dataset import AugmentedImages, EpochSampler, image_source, subset
from sketch_core.duplicates import duplicate_groups
from sketch_core.errors import SketchError
from sketch_core.features import (
    PLAIN_VIEW,
    FeatureBatches,
    FeatureStore,
    encode_batches,
    frozen_backbone,
    training_views,
)
from sketch_core.io import atomic_write
from sketch_core.models import SketchClassifier, create_classifier, data_config
from sketch_core.predict import predict_probs


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class TrainingRun:
    """Everything one configuration trains with: data, model, optimiser, schedule, EMA.

    ``state`` (from ``state_dict()`` of an earlier run, e.g. a loaded checkpoint) resumes after
    the epoch it was saved at. ``start_from`` (such a state too) gives only the weights this run
    starts from, the ones that run evaluated (its EMA's with ``ema_eval``); the optimiser, the
    schedule and the epochs start afresh: a warm start, e.g. a search trial's model continued on
    all the training data.
    """

    def __init__(
        self,
        config: TrainConfig,
        *,
        device: torch.device | None = None,
        state: dict[str, Any] | None = None,
        start_from: dict[str, Any] | None = None,
        table: TrainTable | None = None,
    ):
        self.config = config
        self.device = device or default_device()
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        self.table = table or read_train_table(config.data_dir)
        seed_everything(config.seed)

        # A head trained on features shares the frozen backbone this process keeps (features.py).
        backbone, self.backbone_digest = (
            frozen_backbone(config, self.device) if self.uses_feature_cache else (None, None)
        )
        self.model = create_classifier(
            config.model,
            num_classes=self.table.num_classes,
            pretrained=config.pretrained,
            checkpoint_file=config.checkpoint_file,
            drop_path_rate=config.drop_path_rate,
            head=config.head,
            head_hidden=config.head_hidden,
            head_dropout=config.head_dropout,
            freeze=config.freeze,
            trainable_blocks=config.trainable_blocks,
            seed=config.seed,
            backbone=backbone,
        ).to(self.device)
        if config.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.normalisation = data_config(self.model)
        self.train_loader, self.val_loader = self._loaders()

        # What training changes, and so what EMA averages and a checkpoint holds: the head alone
        # when it trains on features (the frozen backbone is rebuilt from its weights).
        self.trained: nn.Module = self.model.head if self.uses_feature_cache else self.model
        if start_from is not None:
            self._check_classes(start_from)
            self.trained.load_state_dict(evaluated_weights(start_from))
        self.ema = (
            ModelEmaV3(self.trained, decay=config.ema_decay, use_warmup=config.ema_warmup)
            if config.ema
            else None
        )
        self.optimizer = create_optimizer_v2(
            self.model,
            opt=config.optimizer,
            lr=config.lr,
            weight_decay=config.weight_decay,
            momentum=config.momentum,
            **({"fused": True} if self._fused_adamw() else {}),
        )
        self.updates_per_epoch = math.ceil(len(self.train_loader) / config.grad_accum_steps)
        self._check_ema_length()
        self.scheduler, _ = create_scheduler_v2(
            self.optimizer,
            sched=config.lr_schedule,
            num_epochs=config.epochs,
            decay_epochs=config.decay_epochs,
            decay_rate=config.decay_rate,
            min_lr=config.min_lr,
            warmup_lr=config.lr * 0.01,
            warmup_epochs=config.warmup_epochs,
            step_on_epochs=False,
            updates_per_epoch=self.updates_per_epoch,
        )
        self.epoch = 0  # epochs completed
        self.last_metrics: dict[str, float] = {}  # of the last completed epoch, kept in checkpoints
        if state is not None:
            self.load_state_dict(state)
        if self.uses_feature_cache:  # after loading the state: features of the weights in use
            self.train_loader, self.val_loader = self._feature_loaders()

        # What a batch from the train loader goes through: the head alone on cached features.
        self.train_model: nn.Module = self.trained
        if self.world_size > 1:
            self.train_model = DistributedDataParallel(
                self.train_model,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
            )
        if config.compile:
            self.train_model = torch.compile(self.train_model)
        self.train_loss_fn = (
            SoftTargetCrossEntropy()
            if config.uses_mixup
            else nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
        )
        # On the device in this process, not in the loader's collate: its draws then follow the
        # per-epoch seed, so a resumed run mixes what the uninterrupted one would have.
        self.mixup = (
            Mixup(
                mixup_alpha=config.mixup_alpha,
                cutmix_alpha=config.cutmix_alpha,
                prob=config.mixup_prob,
                label_smoothing=config.label_smoothing,
                num_classes=self.table.num_classes,
            )
            if config.uses_mixup
            else None
        )
        self.batches_this_epoch = 0  # training batches through train_step since the epoch began
        self.train_model.train()  # train_step restores it only after evaluate() (see there)

    @property
    def eval_model(self) -> SketchClassifier:
        """The weights to evaluate, keep and predict with: the EMA copy when EMA is on and
        ``ema_eval`` names it, else the raw weights."""
        return self.ema_model if self.ema is not None and self.config.ema_eval else self.model

    @property
    def ema_model(self) -> SketchClassifier:
        """The whole classifier with the EMA's weights for what trains (the head alone on
        features)."""
        if self.uses_feature_cache:
            return SketchClassifier(self.model.backbone, self.ema.module, self.config.freeze)
        return self.ema.module

    def predict(self, paths: list[str], *, tta: bool = TTA) -> np.ndarray:
        """Class probabilities of ``eval_model`` for the images ``paths`` (shape (images, classes)),
        made square by the run's resize policy and normalised as its training images were, with
        test-time augmentation when ``tta``: the one prediction path of trials, refits, ensembles,
        ``sketch_core.train --predict`` and the benchmarks. Under ``torch.distributed`` every rank
        predicts a shard and gets the whole result."""
        config = self.config
        return predict_probs(
            self.eval_model,
            paths,
            image_size=config.image_size,
            resize=config.resize,
            mean=self.normalisation["mean"],
            std=self.normalisation["std"],
            device=self.device,
            tta=tta,
            batch_size=config.batch_size * 2,
            num_workers=config.num_workers,
            cached=config.decode_cache,
            amp=config.amp,
        )

    @property
    def uses_feature_cache(self) -> bool:
        """Whether the head trains on cached backbone features (``sketch_core.features``)."""
        return self.config.uses_feature_cache

    def epochs(self, until: int | None = None) -> Iterator[dict[str, float]]:
        """Train from the next epoch up to ``until`` (default: the config's ``epochs``), yielding
        ``epoch, train_loss, val_loss, val_acc, lr, images_per_s, feature_cache`` (1.0 when the head
        trained on cached features, else 0.0) after each."""
        last = min(until or self.config.epochs, self.config.epochs)
        while self.epoch < last:
            seed_everything(self.config.seed * 100_003 + self.epoch * 101 + self.rank)
            train_loss, images_per_s = self._train_one_epoch()
            self.epoch += 1
            metrics = {
                "epoch": self.epoch,
                "train_loss": train_loss,
                "lr": self._lr(),
                "images_per_s": images_per_s,
                "feature_cache": float(self.uses_feature_cache),
            }
            if self.val_loader is not None:
                metrics.update(self.evaluate())
            self.last_metrics = metrics
            yield metrics

    def evaluate(self) -> dict[str, float]:
        """``val_loss`` and ``val_acc`` of ``eval_model`` on ``val_images`` images; with EMA on,
        also ``val_acc_ema`` and ``val_acc_raw``, what the average and the raw weights each score
        (the report compares them)."""
        metrics = self._validate(self.eval_model)
        if self.ema is not None:
            other = self._validate(self.model if self.config.ema_eval else self.ema_model)
            ema, raw = (metrics, other) if self.config.ema_eval else (other, metrics)
            metrics = {**metrics, "val_acc_ema": ema["val_acc"], "val_acc_raw": raw["val_acc"]}
        return metrics

    def _validate(self, model: SketchClassifier) -> dict[str, float]:
        model = model.eval()
        if self.uses_feature_cache:
            model = model.head
        totals = torch.zeros(3, dtype=torch.float64, device=self.device)  # loss sum, correct, count
        loss_fn = nn.CrossEntropyLoss(reduction="sum")
        with torch.no_grad(), self._autocast():
            for images, targets in self.val_loader:
                logits = model(self._prepare(images)).float()
                totals += torch.stack(
                    [
                        loss_fn(logits, targets).double(),
                        (logits.argmax(1) == targets).sum().double(),
                        torch.tensor(len(targets), dtype=torch.float64, device=self.device),
                    ]
                )
        loss_sum, correct, count = self._all_reduce(totals).tolist()
        return {
            "val_loss": loss_sum / max(count, 1),
            "val_acc": correct / max(count, 1),
            "val_images": count,
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "model": self.trained.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "metrics": self.last_metrics,
            "config": self.config.to_dict(),
            "class_names": self.table.class_names,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._check_classes(state)
        self.trained.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])
        self.epoch = int(state["epoch"])
        self.last_metrics = dict(state.get("metrics") or {})

    def train_step(self, images: torch.Tensor, targets: torch.Tensor) -> dict[str, Any]:
        """Train on one batch as the train loader hands it over (normalised, on the device): the
        step every trial runs for each of its batches, and the one bench/gpu_throughput.py times.

        Mixup/CutMix if configured; forward and loss under autocast (bf16 on CUDA with ``amp``) and
        backward of the loss over ``grad_accum_steps``; on the batch that ends an accumulation (or
        the epoch), gradient clipping, the optimiser and scheduler steps and the EMA update.
        Returns ``loss`` (the batch's mean loss, a tensor on the device, so the step does not wait
        for the GPU), ``images`` (the batch size) and ``updated`` (whether the optimiser stepped).
        """
        config = self.config
        # Only evaluate() leaves the model in eval mode; train() every batch would cost ms on a
        # large model.
        if not self.trained.training:
            self.train_model.train()
        batch = self.batches_this_epoch
        self.batches_this_epoch += 1
        if self.mixup is not None:
            images, targets = self.mixup(images, targets)
        updates_now = (batch + 1) % config.grad_accum_steps == 0 or batch + 1 == len(
            self.train_loader
        )
        sync = nullcontext() if updates_now or self.world_size == 1 else self.train_model.no_sync()
        with sync, self._autocast():
            loss = self.train_loss_fn(self.train_model(self._prepare(images)), targets)
            (loss / config.grad_accum_steps).backward()
        if updates_now:
            if config.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), config.grad_clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            update = self.epoch * self.updates_per_epoch + (batch // config.grad_accum_steps) + 1
            self.scheduler.step_update(num_updates=update)
            if self.ema is not None:
                self.ema.update(self.trained, step=update)
        return {"loss": loss.detach(), "images": len(targets), "updated": updates_now}

    def _train_one_epoch(self) -> tuple[float, float]:
        self.train_sampler.set_epoch(self.epoch)  # the order of the image and the feature batches
        self.batches_this_epoch = 0
        totals = torch.zeros(2, dtype=torch.float64, device=self.device)  # loss sum, images
        started = time.perf_counter()
        self.optimizer.zero_grad(
            set_to_none=True
        )  # drops an accumulation train_step left unfinished
        for images, targets in self.train_loader:
            result = self.train_step(images, targets)
            totals += torch.stack(
                [
                    result["loss"].double() * result["images"],
                    torch.tensor(result["images"], dtype=torch.float64, device=self.device),
                ]
            )
        self.scheduler.step(self.epoch + 1)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elapsed = torch.tensor(
            [time.perf_counter() - started], dtype=torch.float64, device=self.device
        )
        loss_sum, images = self._all_reduce(totals).tolist()
        slowest = (
            self._all_reduce(elapsed, op=dist.ReduceOp.MAX).item()
            if self.world_size > 1
            else elapsed.item()
        )
        return loss_sum / max(images, 1), images / max(slowest, 1e-9)

    def _check_classes(self, state: dict[str, Any]) -> None:
        if state.get("class_names", self.table.class_names) != self.table.class_names:
            raise SketchError(
                f"{self.config.data_dir}: classes differ from those the checkpoint was trained on"
            )

    def _check_ema_length(self) -> None:
        """Refuse a constant EMA decay that averages over more optimiser steps than the run has:
        its average would still hold much of the initial weights at the end."""
        config = self.config
        steps = config.epochs * self.updates_per_epoch
        horizon = 1 / (1 - config.ema_decay)  # the average's time constant, in optimiser steps
        if config.ema and not config.ema_warmup and horizon > steps:
            raise SketchError(
                f"ema_decay: {config.ema_decay} averages over about {horizon:.0f} optimiser steps, "
                f"more than the {steps} of this run ({config.epochs} epochs of "
                f"{self.updates_per_epoch}); turn ema_warmup on, or choose a decay of at most "
                f"{1 - 1 / steps:.4g}"
            )

    def _loaders(self) -> tuple[PrefetchLoader, PrefetchLoader | None]:
        config, table = self.config, self.table
        held_out = (
            config.folds or config.val_fraction
        )  # an all-training refit has no split to keep groups out of
        groups = (
            duplicate_groups(table.paths, table.targets, workers=config.num_workers)
            if config.group_duplicates and held_out
            else None
        )
        train_idx, val_idx = split_indices(
            table.targets,
            val_fraction=config.val_fraction,
            folds=config.folds,
            fold=config.fold,
            seed=config.seed,
            groups=groups,
        )
        images = image_source(
            table.paths,
            config.image_size,
            resize=config.resize,
            cached=config.decode_cache,
            workers=config.num_workers,
        )
        self.images, self.split = images, (train_idx, val_idx)  # what the feature cache encodes
        train_set = AugmentedImages(
            subset(images, train_idx),
            table.targets[train_idx],
            config.augment,
            config.image_size,
            seed=config.seed,
        )
        per_rank = len(train_set) // self.world_size
        if per_rank < config.batch_size:
            raise SketchError(
                f"batch_size: {config.batch_size} per worker exceeds the {per_rank} training "
                f"images each of {self.world_size} worker(s) gets"
            )
        self.train_sampler = DistributedSampler(
            train_set,
            num_replicas=self.world_size,
            rank=self.rank,
            shuffle=True,
            seed=config.seed,
            drop_last=True,
        )
        train_loader = self._prefetch(
            DataLoader(
                train_set,
                batch_size=config.batch_size,
                sampler=EpochSampler(self.train_sampler),
                drop_last=True,
                collate_fn=fast_collate,
                **self._loader_options(),
            )
        )
        if len(val_idx) == 0:
            return train_loader, None
        val_set = AugmentedImages(
            subset(images, val_idx), table.targets[val_idx], "none", config.image_size
        )
        # Strided shards cover every validation image exactly once (DistributedSampler would pad).
        val_shard = Subset(val_set, range(self.rank, len(val_set), self.world_size))
        val_loader = self._prefetch(
            DataLoader(
                val_shard,
                batch_size=config.batch_size * 2,
                shuffle=False,
                collate_fn=fast_collate,
                **self._loader_options(),
            )
        )
        return train_loader, val_loader

    def _feature_loaders(self) -> tuple[FeatureBatches, FeatureBatches | None]:
        """Batches of cached backbone features in place of the image loaders: the training batches
        follow the image loader's sampler, validation reads the same strided shard."""
        config, (train_idx, val_idx) = self.config, self.split
        backbone = self.model.backbone

        def encode(
            views,
        ) -> torch.Tensor:  # as the uncached model sees them: PrefetchLoader, autocast
            loader = DataLoader(
                views,
                batch_size=config.batch_size * 2,
                collate_fn=fast_collate,
                num_workers=config.num_workers,
                pin_memory=self.device.type == "cuda",
            )
            return encode_batches(
                lambda images: backbone(self._prepare(images)),
                self._prefetch(loader),
                self._autocast,
            )

        store = FeatureStore(
            self.backbone_digest,
            self.images,
            encode,
            model=config.model,
            pretrained=config.pretrained,
            checkpoint_file=config.checkpoint_file,
            mean=self.normalisation["mean"],
            std=self.normalisation["std"],
            precision="bf16" if self._amp else "fp32",
        )
        train = FeatureBatches(
            [store.features(*view, self.device) for view in training_views(config)],
            train_idx,
            self.table.targets[train_idx],
            batch_size=config.batch_size,
            device=self.device,
            sampler=self.train_sampler,
            drop_last=True,
        )
        if self.val_loader is None:
            return train, None
        val_rows = val_idx[self.rank :: self.world_size]
        return train, FeatureBatches(
            [store.features(*PLAIN_VIEW, self.device)],
            val_rows,
            self.table.targets[val_rows],
            batch_size=config.batch_size * 2,
            device=self.device,
        )

    def _loader_options(self) -> dict[str, Any]:
        workers = self.config.num_workers
        return {
            "num_workers": workers,
            "persistent_workers": workers > 0,
            "pin_memory": self.device.type == "cuda",
        }

    def _prefetch(self, loader: DataLoader) -> PrefetchLoader:
        return PrefetchLoader(
            loader,
            mean=self.normalisation["mean"],
            std=self.normalisation["std"],
            device=self.device,
        )

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        if self.config.channels_last and images.ndim == 4:  # not cached features
            return images.contiguous(memory_format=torch.channels_last)
        return images

    @property
    def _amp(self) -> bool:
        return self.config.amp and self.device.type == "cuda"

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self._amp)

    def _fused_adamw(self) -> bool:
        return self.config.optimizer == "adamw" and self.device.type == "cuda"

    def _lr(self) -> float:
        return max(group["lr"] for group in self.optimizer.param_groups)

    def _all_reduce(self, tensor: torch.Tensor, op=None) -> torch.Tensor:
        if self.world_size > 1:
            dist.all_reduce(tensor, op=op or dist.ReduceOp.SUM)
        return tensor


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Atomically: a crash mid-write leaves the previous checkpoint in place."""
    atomic_write(path, lambda partial: torch.save(state, partial))


def evaluated_weights(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The weights of what trained that a checkpoint's run evaluated and predicted with: its EMA
    average when it kept one and evaluated it (``ema_eval``), else its raw weights."""
    config = state.get("config") or {}
    if state.get("ema") is not None and config.get("ema_eval", True):
        return {key.removeprefix("module."): value for key, value in state["ema"].items()}
    return state["model"]


def save_backbone(run: TrainingRun, path: str | Path) -> Path:
    """The backbone of ``run.eval_model`` as a safetensors file, under timm's names and without a
    head: weights that ``model.checkpoint_file`` loads (``models.checkpoint_weights``)."""
    from safetensors.torch import save_file

    state = {
        key: value.detach().cpu().contiguous()
        for key, value in run.eval_model.backbone.state_dict().items()
    }
    return atomic_write(path, lambda partial: save_file(state, str(partial)))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise SketchError(f"{path}: checkpoint not found") from None
    except Exception as exc:  # torch raises several types for a truncated or foreign file
        raise SketchError(f"{path}: not a readable checkpoint ({type(exc).__name__})") from None
