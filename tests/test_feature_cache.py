"""The feature cache for head-only training: same numbers as the backbone, keyed correctly, same
training results as without it, and the cases where it must not be used."""

import os
import shutil

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from conftest import QUICK_TRAINING, free_port
from timm.data.loader import PrefetchLoader, fast_collate
from torch.utils.data import DataLoader

from sketch_core.config import TrainConfig
from sketch_core.data import read_train_table
from sketch_core.dataset import AugmentedImages, DecodeCache
from sketch_core.engine import TrainingRun, load_checkpoint, save_checkpoint, seed_everything
from sketch_core.features import FeatureBatches, FeatureStore, encode_batches, weights_digest
from sketch_core.models import create_classifier, data_config

HEAD_ONLY = {**QUICK_TRAINING, "freeze": "head", "augment": "none", "lr": 2e-2}


def head_config(demo_dir, **changes):
    return TrainConfig.from_dict({**HEAD_ONLY, "data_dir": str(demo_dir), "epochs": 3, **changes})


def backbone(seed=0, model="test_resnet"):
    seed_everything(seed)
    classifier = create_classifier(model, num_classes=3, freeze="head")
    return classifier.backbone.eval(), data_config(classifier)


class Counting:
    """An ``encode`` for FeatureStore that runs ``backbone`` as the engine does, counting calls."""

    def __init__(self, net, normalisation):
        self.net, self.normalisation, self.calls = net, normalisation, 0

    def __call__(self, views):
        self.calls += 1
        loader = PrefetchLoader(
            DataLoader(views, batch_size=5, collate_fn=fast_collate),
            mean=self.normalisation["mean"],
            std=self.normalisation["std"],
            device=torch.device("cpu"),
        )
        return encode_batches(self.net, loader, torch.no_grad)


def store_for(images, net, normalisation, cache_dir, model="test_resnet"):
    encode = Counting(net, normalisation)
    return FeatureStore(
        weights_digest(net),
        images,
        encode,
        model=model,
        pretrained=False,
        checkpoint_file="",
        mean=normalisation["mean"],
        std=normalisation["std"],
        precision="fp32",
        cache_dir=cache_dir,
    ), encode


def normalised(images, normalisation):
    mean = torch.tensor(normalisation["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(normalisation["std"]).view(1, 3, 1, 1)
    batch = torch.from_numpy(np.stack([image.transpose(2, 0, 1) for image in images])).float() / 255
    return (batch - mean) / std


@pytest.fixture
def few_images(demo_dir, tmp_path):
    """Copies of 12 demo images (their mtimes are changed in tests) and their decode cache."""
    folder = tmp_path / "images"
    folder.mkdir()
    paths = [
        shutil.copy(path, folder / f"{index}.jpg")
        for index, path in enumerate(read_train_table(demo_dir).paths[:12])
    ]
    return paths


@pytest.mark.parametrize("model", ["test_resnet", "test_vit"])
def test_cached_features_equal_the_backbones_output(few_images, tmp_path, model):
    size = 160 if model == "test_vit" else 48  # test_vit is built for 160 px inputs
    images = DecodeCache(few_images, size, cache_dir=tmp_path, build_workers=0)
    net, normalisation = backbone(model=model)
    store, _ = store_for(images, net, normalisation, tmp_path, model=model)
    cached = store.features("none", 0)
    with torch.no_grad():
        expected = net(normalised([images[i] for i in range(len(images))], normalisation))
    assert cached.shape == expected.shape == (12, net.num_features)
    assert torch.allclose(cached, expected, atol=1e-5, rtol=1e-4)


def test_cache_is_reused_and_rebuilt_when_its_key_changes(few_images, tmp_path):
    images = DecodeCache(few_images, 32, cache_dir=tmp_path, build_workers=0)
    net, normalisation = backbone()
    store, encode = store_for(images, net, normalisation, tmp_path)
    first = store.features("none", 0)
    file = store.file("none", 0)
    assert file.exists() and encode.calls == 1
    built_at = file.stat().st_mtime_ns

    again, encode_again = store_for(images, net, normalisation, tmp_path)
    assert (
        torch.equal(again.features("none", 0), first) and encode_again.calls == 0
    )  # reused, not recomputed
    assert again.file("none", 0) == file and file.stat().st_mtime_ns == built_at

    other_size = store_for(
        DecodeCache(few_images, 40, cache_dir=tmp_path, build_workers=0),
        net,
        normalisation,
        tmp_path,
    )[0]
    other_weights = store_for(images, backbone(seed=1)[0], normalisation, tmp_path)[
        0
    ]  # another seed's init
    assert other_size.file("none", 0) != file and other_weights.file("none", 0) != file
    assert (
        len({store.file("light", 0), store.file("light", 1), store.file("sketch", 1), file}) == 4
    )  # views

    os.utime(few_images[0], ns=(0, 0))  # an image file changed
    changed, encode_changed = store_for(
        DecodeCache(few_images, 32, cache_dir=tmp_path, build_workers=0),
        net,
        normalisation,
        tmp_path,
    )
    changed.features("none", 0)
    assert changed.file("none", 0) != file and encode_changed.calls == 1
    assert not list(tmp_path.glob("*.partial-*"))


def test_letterbox_and_stretch_images_never_share_features(few_images, tmp_path):
    net, normalisation = backbone()
    letterbox, _ = store_for(
        DecodeCache(few_images, 32, cache_dir=tmp_path, build_workers=0),
        net,
        normalisation,
        tmp_path,
    )
    letterboxed = letterbox.features("none", 0)  # now kept in this process as well as on disk
    stretch, encode = store_for(
        DecodeCache(few_images, 32, cache_dir=tmp_path, build_workers=0, resize="stretch"),
        net,
        normalisation,
        tmp_path,
    )
    assert stretch.identity["resize"] == "stretch" and letterbox.identity["resize"] == "letterbox"
    assert stretch.file("none", 0) != letterbox.file("none", 0)
    stretched = stretch.features("none", 0)
    assert encode.calls == 1 and not torch.allclose(
        stretched, letterboxed
    )  # encoded, not the kept letterbox ones


def test_a_head_run_reads_the_features_of_its_resize_policy(demo_dir):
    """The policy reaches the engine's decode cache and feature store, also in a process that keeps
    the other policy's backbone and features."""
    letterbox = TrainingRun(head_config(demo_dir, epochs=1))
    stretch = TrainingRun(head_config(demo_dir, epochs=1, resize="stretch"))
    assert (letterbox.images.resize, stretch.images.resize) == ("letterbox", "stretch")
    assert (
        stretch.model.backbone is letterbox.model.backbone
    )  # the same weights: kept, as they should be
    assert not torch.equal(stretch.train_loader.views[0], letterbox.train_loader.views[0])


def test_augmented_views_are_fixed_per_view_and_differ_between_views(few_images, tmp_path):
    images = DecodeCache(few_images, 32, cache_dir=tmp_path, build_workers=0)
    view1, view1_again, view2 = (
        AugmentedImages(images, np.zeros(len(images)), "sketch", 32, seed=view)
        for view in (1, 1, 2)
    )
    order = [5, 0, 11, 3]  # another order, as another loader worker would read them
    for index in order:
        assert np.array_equal(view1[index][0], view1_again[index][0])
    assert any(not np.array_equal(view1[i][0], view2[i][0]) for i in range(len(images)))


def test_feature_batches_follow_the_sampler_and_cycle_views():
    views = [torch.full((6, 2), float(v)) + torch.arange(6.0)[:, None] * 10 for v in range(3)]
    sampler = torch.utils.data.DistributedSampler(
        range(4), num_replicas=1, rank=0, shuffle=True, seed=0, drop_last=True
    )
    batches = FeatureBatches(
        views,
        rows=[1, 2, 4, 5],
        targets=[0, 1, 2, 3],
        batch_size=3,
        device=torch.device("cpu"),
        sampler=sampler,
        drop_last=True,
    )
    assert len(batches) == 1
    for epoch in range(4):
        sampler.set_epoch(epoch)
        ((features, targets),) = list(batches)
        positions = list(sampler)[:3]
        assert targets.tolist() == positions
        assert features[:, 0].tolist() == [10.0 * [1, 2, 4, 5][p] + epoch % 3 for p in positions]


def test_head_only_training_gives_the_same_results_with_and_without_the_cache(demo_dir):
    histories = {}
    for cached in (False, True):  # with EMA: train_loss checks the live head, val_* the EMA head
        run = TrainingRun(head_config(demo_dir, feature_cache=cached, ema=True, ema_decay=0.9))
        assert run.uses_feature_cache == cached
        histories[cached] = list(run.epochs())
    assert all(m["feature_cache"] == 0.0 for m in histories[False])
    assert all(m["feature_cache"] == 1.0 for m in histories[True])
    for plain, cached in zip(histories[False], histories[True]):
        assert cached["epoch"] == plain["epoch"]
        assert cached["val_acc"] == pytest.approx(plain["val_acc"], abs=1e-9)
        for key in ("train_loss", "val_loss", "lr"):
            assert cached[key] == pytest.approx(plain[key], rel=1e-4), key
    # (A randomly initialised frozen backbone gives weak features, but the head does fit them.)
    assert histories[True][-1]["train_loss"] < histories[True][0]["train_loss"]


def test_augmented_views_train_and_resume_from_a_checkpoint(demo_dir, tmp_path):
    config = head_config(demo_dir, augment="light", feature_views=2, epochs=3)
    straight = TrainingRun(config)
    assert len(straight.train_loader.views) == 2
    straight_history = list(straight.epochs())
    assert all(m["feature_cache"] == 1.0 for m in straight_history)

    first = TrainingRun(config)
    first_history = list(first.epochs(until=2))
    save_checkpoint(first.state_dict(), tmp_path / "last.pt")
    state = load_checkpoint(tmp_path / "last.pt")
    # What the run trains, not the frozen backbone (EVA02-L: 1.2 GB per checkpoint otherwise).
    assert set(state["model"]) == set(first.model.head.state_dict())
    resumed = TrainingRun(config, state=state)
    history = first_history + list(resumed.epochs())
    for expected, got in zip(straight_history, history):
        assert got["train_loss"] == pytest.approx(expected["train_loss"], rel=1e-5)
        assert got["val_acc"] == pytest.approx(expected["val_acc"])


def test_a_process_keeps_its_frozen_backbone_and_features_for_the_next_run(demo_dir):
    """Ray Tune reuses a head trial's process for the next trial: that trial finds the backbone
    and its features in memory and trains exactly as it would in a new process."""
    config = head_config(demo_dir, epochs=2, ema=True, ema_decay=0.9)
    first = TrainingRun(config)
    first_history = list(first.epochs())
    other_head = TrainingRun(head_config(demo_dir, epochs=2, head="mlp", lr=1e-2))
    assert other_head.model.backbone is first.model.backbone
    assert other_head.train_loader.views[0] is first.train_loader.views[0]  # not read again
    list(other_head.epochs())
    again = TrainingRun(config)

    def numbers(history):
        return [
            {key: value for key, value in metrics.items() if key != "images_per_s"}
            for metrics in history
        ]

    # The head's init follows the seed, not what ran before it in this process.
    assert numbers(again.epochs()) == numbers(first_history)
    assert (
        TrainingRun(head_config(demo_dir, seed=1)).model.backbone is not first.model.backbone
    )  # other weights


def test_mixup_with_a_frozen_backbone_trains_on_images(demo_dir):
    run = TrainingRun(head_config(demo_dir, mixup_alpha=0.4, epochs=1))
    assert not run.uses_feature_cache
    (metrics,) = list(run.epochs())
    assert metrics["feature_cache"] == 0.0 and np.isfinite(metrics["train_loss"])
    assert not TrainingRun(head_config(demo_dir, feature_cache=False, epochs=1)).uses_feature_cache
    assert not TrainingRun(head_config(demo_dir, freeze="none", epochs=1)).uses_feature_cache


def _ddp_worker(rank, world_size, port, data_dir, results):
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size
    )
    try:
        torch.set_num_threads(1)
        for feature_cache in (True, False):
            run = TrainingRun(head_config(data_dir, epochs=2, feature_cache=feature_cache))
            results.put((feature_cache, rank, list(run.epochs()), len(run.train_loader)))
    finally:
        dist.destroy_process_group()


def test_ddp_ranks_train_on_their_shards_of_the_cache(demo_dir):
    context = mp.get_context("spawn")
    results = context.Queue()
    mp.start_processes(
        _ddp_worker,
        args=(2, free_port(), str(demo_dir), results),
        nprocs=2,
        start_method="spawn",
        join=True,
    )
    runs = {}
    for _ in range(4):
        feature_cache, rank, history, batches = results.get()
        runs[feature_cache, rank] = history, batches
    single = len(TrainingRun(head_config(demo_dir, epochs=2)).train_loader)
    assert runs[True, 0][1] == runs[True, 1][1] == single // 2  # each rank sees half the batches
    assert runs[True, 0][0] == runs[True, 1][0] and all(
        m["feature_cache"] == 1.0 for m in runs[True, 0][0]
    )
    for with_cache, without in zip(runs[True, 0][0], runs[False, 0][0]):
        assert with_cache["val_acc"] == pytest.approx(without["val_acc"], abs=1e-9)
        assert with_cache["train_loss"] == pytest.approx(without["train_loss"], rel=1e-4)
