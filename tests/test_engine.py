"""The train loop on real demo files: learning, prediction, resume, DDP."""

import copy
import dataclasses
import importlib.util
import json

import numpy as np
import pandas as pd
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import QUICK_TRAINING, REPO_ROOT, free_port
from torch.nn.utils import parameters_to_vector

from sketch_core.config import TrainConfig
from sketch_core.data import read_test_table
from sketch_core.engine import TrainingRun, load_checkpoint, save_checkpoint
from sketch_core.errors import SketchError
from sketch_core.predict import write_submission

METRICS = {
    "epoch",
    "train_loss",
    "val_loss",
    "val_acc",
    "val_images",
    "lr",
    "images_per_s",
    "feature_cache",
}


def quick_config(demo_dir, **changes):
    return TrainConfig.from_dict(
        {**QUICK_TRAINING, "data_dir": str(demo_dir), "epochs": 10, **changes}
    )


def test_learns_well_above_chance_and_predictions_agree_with_answers(demo_dir, tmp_path):
    run = TrainingRun(quick_config(demo_dir))
    history = list(run.epochs())
    assert [m["epoch"] for m in history] == list(range(1, 11))
    assert all(set(m) == METRICS for m in history)
    assert {m["val_images"] for m in history} == {64}  # 8 classes x 40 images, a fifth held out
    chance = 1 / run.table.num_classes
    best_val = max(m["val_acc"] for m in history)
    assert best_val >= 3 * chance, history

    test = read_test_table(demo_dir)
    probs = run.predict(test.paths)
    assert probs.shape == (80, 8) and np.allclose(probs.sum(1), 1, atol=1e-4)
    submission = write_submission(tmp_path / "submission.csv", test.frame, probs)
    written = pd.read_csv(submission)
    assert list(written.columns) == ["ID", "image_path", "target"]
    assert written["image_path"].tolist() == test.frame["image_path"].tolist()
    answers = pd.read_csv(demo_dir / "test_answers.csv")
    test_acc = (written["target"].to_numpy() == answers["target"].to_numpy()).mean()
    assert test_acc >= 3 * chance and abs(test_acc - history[-1]["val_acc"]) < 0.2


def test_resume_continues_exactly_where_it_stopped(demo_dir, tmp_path):
    """As the shipped GPU spaces train (loader workers, augmentation, Mixup, EMA): the same seed
    gives the same run, and a resumed run draws what the uninterrupted one would have."""
    config = quick_config(
        demo_dir, epochs=3, augment="sketch", num_workers=2, mixup_alpha=0.2, ema=True
    )
    straight = TrainingRun(config)
    straight_history = list(straight.epochs())

    first = TrainingRun(config)
    first_history = list(first.epochs(until=2))
    save_checkpoint(first.state_dict(), tmp_path / "last.pt")
    resumed = TrainingRun(config, state=load_checkpoint(tmp_path / "last.pt"))
    assert resumed.epoch == 2
    resumed_history = list(resumed.epochs())
    assert [m["epoch"] for m in resumed_history] == [3]
    for expected, got in zip(straight_history, first_history + resumed_history):
        assert got["train_loss"] == pytest.approx(expected["train_loss"], rel=1e-5)
        assert got["val_acc"] == pytest.approx(expected["val_acc"])
    for name, tensor in straight.model.state_dict().items():
        assert torch.allclose(tensor, resumed.model.state_dict()[name], atol=1e-6), name


def test_checkpoint_errors(tmp_path):
    with pytest.raises(SketchError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "none.pt")
    (tmp_path / "bad.pt").write_bytes(b"garbage")
    with pytest.raises(SketchError, match="not a readable checkpoint"):
        load_checkpoint(tmp_path / "bad.pt")


def test_step_schedule_gives_the_lr_it_names_at_each_epoch(demo_dir):
    history = list(
        TrainingRun(
            quick_config(
                demo_dir, epochs=3, lr_schedule="step", decay_epochs=1, decay_rate=0.1, lr=1e-2
            )
        ).epochs()
    )
    assert [m["lr"] for m in history] == pytest.approx([1e-3, 1e-4, 1e-5])
    warm = TrainingRun(quick_config(demo_dir, epochs=3, warmup_epochs=1, lr=1e-2))
    assert warm._lr() == pytest.approx(1e-4)  # warmup starts at 1% of lr
    # then the cosine over all 3 epochs (timm's warmup overlaps it):
    # lr * (1 + cos(pi / 3)) / 2 after epoch 1
    assert next(warm.epochs())["lr"] == pytest.approx(7.5e-3)


def gradient_norms(run: TrainingRun) -> list[float]:
    """The norm of the gradients each optimiser step of ``run`` applies, recorded as it trains."""
    norms, step = [], run.optimizer.step

    def recording_step(*args, **kwargs):
        grads = [p.grad for p in run.model.parameters() if p.grad is not None]
        norms.append(
            float(
                torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
            )
        )
        return step(*args, **kwargs)

    run.optimizer.step = recording_step
    return norms


def test_gradient_clipping_bounds_every_step(demo_dir):
    clipped, free = (
        TrainingRun(quick_config(demo_dir, epochs=1, grad_clip=clip)) for clip in (0.05, 0.0)
    )
    clipped_norms, free_norms = gradient_norms(clipped), gradient_norms(free)
    list(clipped.epochs()), list(free.epochs())
    assert len(clipped_norms) == len(free_norms) == len(clipped.train_loader)
    assert max(clipped_norms) <= 0.05 * (1 + 1e-4)
    assert min(free_norms) > 0.05  # so the bound above is clipping's doing


def first_batch(run: TrainingRun) -> tuple[torch.Tensor, torch.Tensor]:
    return next(iter(run.train_loader))


def test_train_step_returns_the_batch_loss_and_updates_the_weights(demo_dir):
    run = TrainingRun(quick_config(demo_dir, epochs=1))
    images, targets = first_batch(run)
    before = copy.deepcopy(run.model)  # in training mode, as the step runs it
    expected_loss = run.train_loss_fn(before(images), targets)
    result = run.train_step(images, targets)
    assert result["updated"] and result["images"] == len(targets)
    assert not result["loss"].requires_grad
    assert result["loss"].item() == pytest.approx(expected_loss.item(), rel=1e-5)
    moved = {
        name
        for (name, after), initial in zip(run.model.named_parameters(), before.parameters())
        if not torch.equal(after, initial)
    }
    assert any(name.startswith("head.") for name in moved) and any(
        name.startswith("backbone.") for name in moved
    )


def test_train_step_accumulates_gradients_until_the_last_batch_of_an_accumulation(demo_dir):
    run = TrainingRun(quick_config(demo_dir, epochs=1, grad_accum_steps=2))
    batch, initial = first_batch(run), parameters_to_vector(run.model.parameters()).clone()
    assert not run.train_step(*batch)["updated"]
    assert torch.equal(parameters_to_vector(run.model.parameters()), initial)
    assert run.train_step(*batch)["updated"]
    assert not torch.equal(parameters_to_vector(run.model.parameters()), initial)


def test_train_step_clips_the_gradient_the_optimiser_applies(demo_dir):
    """SGD's first step is linear in the gradient (no weight decay): clipped from norm |g| to c, the
    weights move c / |g| as far as unclipped, from the same weights on the same batch."""
    moves, norms = {}, {}
    for clip in (0.05, 0.0):
        run = TrainingRun(
            quick_config(
                demo_dir, epochs=1, optimizer="sgd", weight_decay=0.0, lr=10.0, grad_clip=clip
            )
        )
        initial = parameters_to_vector(run.model.parameters()).clone()
        norms[clip] = gradient_norms(run)
        run.train_step(*first_batch(run))
        moves[clip] = torch.linalg.vector_norm(
            parameters_to_vector(run.model.parameters()) - initial
        ).item()
    [clipped], [free] = norms[0.05], norms[0.0]
    assert clipped == pytest.approx(0.05, rel=1e-4) and free > 0.05
    assert moves[0.05] / moves[0.0] == pytest.approx(0.05 / free, rel=1e-3)


def test_epoch_loop_trains_every_batch_through_train_step_and_repeats_with_the_seed(demo_dir):
    config = quick_config(demo_dir, epochs=2, mixup_alpha=0.2, ema=True, grad_clip=0.5)
    recorded, repeated = TrainingRun(config), TrainingRun(config)
    losses, train_step = [], recorded.train_step

    def recording_step(images, targets):
        result = train_step(images, targets)
        losses.append(result["loss"].item())
        return result

    recorded.train_step = recording_step
    histories = [
        [{k: v for k, v in m.items() if k != "images_per_s"} for m in run.epochs()]
        for run in (recorded, repeated)
    ]
    batches = len(recorded.train_loader)
    assert len(losses) == 2 * batches
    for epoch, metrics in enumerate(
        histories[0]
    ):  # every batch is full (drop_last): the plain mean
        assert metrics["train_loss"] == pytest.approx(
            np.mean(losses[epoch * batches : (epoch + 1) * batches]), rel=1e-9
        )
    assert histories[0] == histories[1]
    for (name, tensor), other in zip(
        recorded.state_dict()["model"].items(), repeated.state_dict()["model"].values()
    ):
        assert torch.equal(tensor, other), name


def test_accumulating_k_batches_of_b_equals_one_batch_of_k_times_b(demo_dir):
    """Gradient accumulation (K=2 batches of 8) against one batch of 16, same data order and
    updates: with SGD and a model without batch statistics (ConvNeXt's LayerNorm) the weights
    agree."""
    common = dict(
        model="test_convnext", optimizer="sgd", augment="none", epochs=1, lr=5e-2, weight_decay=0.0
    )
    accumulated = TrainingRun(quick_config(demo_dir, batch_size=8, grad_accum_steps=2, **common))
    single = TrainingRun(quick_config(demo_dir, batch_size=16, **common))
    assert accumulated.updates_per_epoch == single.updates_per_epoch == len(single.train_loader)
    assert (
        isinstance(single.optimizer, torch.optim.SGD)
        and single.optimizer.param_groups[0]["momentum"] == 0.9
    )
    [a], [b] = list(accumulated.epochs()), list(single.epochs())
    assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
    moved = False
    for (name, after), initial in zip(
        single.model.state_dict().items(),
        TrainingRun(quick_config(demo_dir, **common)).model.state_dict().values(),
    ):
        torch.testing.assert_close(
            accumulated.model.state_dict()[name], after, rtol=1e-4, atol=1e-5
        )
        moved |= not torch.equal(after, initial)
    assert moved, "SGD changed no weight"


def test_mixup_and_cutmix_train_on_mixed_images_and_soft_targets(demo_dir):
    run = TrainingRun(quick_config(demo_dir, epochs=1, mixup_alpha=0.4, cutmix_alpha=1.0))
    seen, loss_fn = [], run.train_loss_fn

    def recording_loss(logits, targets):
        seen.append(targets.detach().clone())
        return loss_fn(logits, targets)

    run.train_loss_fn = recording_loss
    [metrics] = list(run.epochs())
    assert np.isfinite(metrics["train_loss"]) and len(seen) == len(run.train_loader)
    targets = torch.cat(seen)
    assert targets.shape == (len(targets), run.table.num_classes)
    torch.testing.assert_close(targets.sum(1), torch.ones(len(targets)))
    # Label smoothing 0.1 over 8 classes puts at most 0.9125 on one class: a mix puts less on its
    # top class.
    assert (targets.max(1).values < 0.9).float().mean() > 0.5


def test_last_n_blocks_trains_only_the_last_blocks_and_the_head(demo_dir):
    run = TrainingRun(
        quick_config(
            demo_dir,
            epochs=1,
            freeze="last_n_blocks",
            trainable_blocks=1,
            head="mlp",
            head_hidden=32,
            head_dropout=0.1,
            augment="heavy",
            drop_path_rate=0.1,
        )
    )
    before = {name: tensor.clone() for name, tensor in run.model.named_parameters()}
    trainable = {name for name, p in run.model.named_parameters() if p.requires_grad}
    assert any(name.startswith("head.") for name in trainable)
    assert trainable and all(
        name.startswith(("head.", "backbone.layer4.", "backbone.fc", "backbone.head"))
        for name in trainable
    ), trainable
    list(run.epochs())
    for name, tensor in run.model.named_parameters():
        assert torch.equal(tensor, before[name]) != (name in trainable), name


def test_compiled_model_trains_like_the_eager_one(demo_dir):
    """torch.compile (on in search_spaces/eva02.yaml) changes speed, not the training or its
    checkpoints."""
    config = quick_config(demo_dir, epochs=1, augment="none")
    eager, compiled = TrainingRun(config), TrainingRun(dataclasses.replace(config, compile=True))
    [eager_metrics], [compiled_metrics] = list(eager.epochs()), list(compiled.epochs())
    assert compiled_metrics["train_loss"] == pytest.approx(eager_metrics["train_loss"], rel=1e-3)
    assert compiled.state_dict()["model"].keys() == eager.state_dict()["model"].keys()


def test_gpu_throughput_quick_run_times_the_engines_train_step(monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location(
        "gpu_throughput", REPO_ROOT / "bench" / "gpu_throughput.py"
    )
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    batches, train_step = [], TrainingRun.train_step

    def counting_step(run, images, targets):
        batches.append(len(images))
        return train_step(run, images, targets)

    monkeypatch.setattr(TrainingRun, "train_step", counting_step)
    threads = torch.get_num_threads()
    torch.set_num_threads(
        1
    )  # two threads spin against each other under other jobs' load on 2 cores
    try:
        bench.main(["--quick", "--device", "cpu"])
    finally:
        torch.set_num_threads(threads)
    figures = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    quick = bench.QUICK
    assert batches == [quick["batch_size"]] * (
        1 + 2 * (quick["warmup"] + quick["steps"])
    )  # flop count, 2 variants
    assert (
        figures["step"] == "TrainingRun.train_step" and figures["grad_clip"] == 1.0
    )  # eva02.yaml's
    assert figures["model"] == "test_vit" and figures["compile_speedup"] is None
    for name in (
        "eager_images_per_s",
        "eager_channels_last_images_per_s",
        "best_images_per_s",
        "train_tflop_per_image",
        "achieved_tflops",
        "channels_last_speedup",
    ):
        assert figures[name] > 0, name


def test_batch_larger_than_the_data_is_refused(demo_dir):
    with pytest.raises(SketchError, match="batch_size: 1000 per worker exceeds"):
        TrainingRun(quick_config(demo_dir, batch_size=1000))


def _ddp_worker(rank, world_size, port, data_dir, results):
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size
    )
    try:
        torch.set_num_threads(1)
        run = TrainingRun(quick_config(data_dir, epochs=2))
        results.put((rank, list(run.epochs()), len(run.train_loader)))
    finally:
        dist.destroy_process_group()


def test_ddp_in_two_processes_reports_the_same_metrics_on_every_rank(demo_dir):
    context = mp.get_context("spawn")
    results = context.Queue()
    mp.start_processes(
        _ddp_worker,
        args=(2, free_port(), str(demo_dir), results),
        nprocs=2,
        start_method="spawn",
        join=True,
    )
    by_rank = dict(
        (rank, (history, batches)) for rank, history, batches in (results.get(), results.get())
    )
    single = len(TrainingRun(quick_config(demo_dir)).train_loader)
    assert by_rank[0][1] == by_rank[1][1] == single // 2  # each rank sees half the batches
    for epoch0, epoch1 in zip(by_rank[0][0], by_rank[1][0]):
        assert set(epoch0) == METRICS
        assert epoch0 == epoch1


def test_ema_reports_the_average_and_the_raw_weights_and_evaluates_the_one_named(demo_dir):
    averaged = TrainingRun(quick_config(demo_dir, epochs=2, ema=True, ema_decay=0.9))
    first = next(averaged.epochs())
    assert set(first) == METRICS | {"val_acc_ema", "val_acc_raw"}
    assert first["val_acc"] == first["val_acc_ema"] and averaged.eval_model is averaged.ema_model
    raw = TrainingRun(quick_config(demo_dir, epochs=2, ema=True, ema_decay=0.9, ema_eval=False))
    metrics = next(raw.epochs())
    assert metrics["val_acc"] == metrics["val_acc_raw"] and raw.eval_model is raw.model
    # The same run either way: the choice changes what is evaluated and kept, not what trains.
    assert (metrics["val_acc_ema"], metrics["val_acc_raw"]) == (
        first["val_acc_ema"],
        first["val_acc_raw"],
    )


def test_a_constant_ema_decay_longer_than_the_run_is_refused_and_warm_up_ramps_it(demo_dir):
    # 256 training images in batches of 16, 2 epochs: 32 optimiser steps
    with pytest.raises(
        SketchError,
        match=r"^ema_decay: 0.999 averages over about 1000 optimiser steps, more "
        r"than the 32 of this run \(2 epochs of 16\); turn ema_warmup on",
    ):
        TrainingRun(quick_config(demo_dir, epochs=2, ema=True, ema_decay=0.999, ema_warmup=False))
    run = TrainingRun(quick_config(demo_dir, epochs=2, ema=True, ema_decay=0.999))
    # timm's warm-up at the 32nd step: 1 - (1 + 31)^(-2/3) = 0.90, not 0.999
    assert run.ema.get_decay(32) == pytest.approx(1 - 32 ** (-2 / 3))
    assert run.ema.get_decay(10**7) == pytest.approx(0.999)


def test_a_warm_start_continues_from_the_weights_it_is_given_with_a_new_schedule(demo_dir):
    trial = TrainingRun(quick_config(demo_dir, epochs=6))
    trained = list(trial.epochs())
    everything = {"val_fraction": 0.0, "epochs": 2}
    cold = next(TrainingRun(quick_config(demo_dir, **everything)).epochs())
    warm_run = TrainingRun(quick_config(demo_dir, **everything), start_from=trial.state_dict())
    assert warm_run.epoch == 0 and warm_run._lr() == pytest.approx(5e-3)  # afresh: epoch 0, full lr
    warm = next(warm_run.epochs())
    assert warm["train_loss"] < 0.75 * cold["train_loss"], (warm, cold, trained[-1])
    assert (
        warm["train_loss"] < 1.2 * trained[-1]["train_loss"]
    )  # where the trial left off, not afresh


def test_ema_on_a_short_fine_tune_of_a_pretrained_backbone_keeps_what_the_run_learned():
    """144 optimiser steps with ema_decay 0.998: a constant decay would still hold most of the
    initial weights (a random head) at the end; timm's warm-up keeps the average with the run."""
    from conftest import SHIPPED_FINE_TUNE

    raw = list(TrainingRun(TrainConfig.from_dict(SHIPPED_FINE_TUNE)).epochs())[-1]["val_acc"]
    averaged = TrainingRun(
        TrainConfig.from_dict({**SHIPPED_FINE_TUNE, "ema": True, "ema_decay": 0.998})
    )
    ema = list(averaged.epochs())[-1]["val_acc"]
    assert raw > 0.7, raw  # the fine-tune itself learned
    assert ema >= raw - 0.03, (ema, raw)
