"""The train loop on real demo files: learning, prediction, resume, DDP."""

import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import QUICK_TRAINING, free_port
from sketch_core.config import TrainConfig
from sketch_core.data import read_test_table
from sketch_core.engine import TrainingRun, load_checkpoint, save_checkpoint
from sketch_core.errors import SketchError
from sketch_core.predict import predict_probs, write_submission

METRICS = {"epoch", "train_loss", "val_loss", "val_acc", "lr", "images_per_s", "feature_cache"}


def quick_config(demo_dir, **changes):
    return TrainConfig.from_dict({**QUICK_TRAINING, "data_dir": str(demo_dir), "epochs": 10, **changes})


def test_learns_well_above_chance_and_predictions_agree_with_answers(demo_dir, tmp_path):
    run = TrainingRun(quick_config(demo_dir))
    history = list(run.epochs())
    assert [m["epoch"] for m in history] == list(range(1, 11))
    assert all(set(m) == METRICS for m in history)
    chance = 1 / run.table.num_classes
    best_val = max(m["val_acc"] for m in history)
    assert best_val >= 3 * chance, history

    test = read_test_table(demo_dir)
    probs = predict_probs(run.eval_model, test.paths, image_size=48, mean=run.normalisation["mean"],
                          std=run.normalisation["std"], device=run.device, num_workers=0)
    assert probs.shape == (80, 8) and np.allclose(probs.sum(1), 1, atol=1e-4)
    submission = write_submission(tmp_path / "submission.csv", test.frame, probs)
    written = pd.read_csv(submission)
    assert list(written.columns) == ["ID", "image_path", "target"]
    assert written["image_path"].tolist() == test.frame["image_path"].tolist()
    answers = pd.read_csv(demo_dir / "test_answers.csv")
    test_acc = (written["target"].to_numpy() == answers["target"].to_numpy()).mean()
    assert test_acc >= 3 * chance and abs(test_acc - history[-1]["val_acc"]) < 0.2


def test_resume_continues_exactly_where_it_stopped(demo_dir, tmp_path):
    config = quick_config(demo_dir, epochs=3, augment="none", ema=True)
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


@pytest.mark.parametrize("changes", [
    dict(mixup_alpha=0.4, cutmix_alpha=1.0, grad_accum_steps=2, grad_clip=1.0, lr_schedule="step",
         decay_epochs=1, optimizer="sgd", warmup_epochs=1),
    dict(freeze="last_n_blocks", trainable_blocks=1, head="mlp", head_hidden=32, head_dropout=0.1,
         augment="heavy", drop_path_rate=0.1),
])
def test_training_options_run(demo_dir, changes):
    history = list(TrainingRun(quick_config(demo_dir, epochs=2, **changes)).epochs())
    assert len(history) == 2 and all(np.isfinite(m["train_loss"]) for m in history)


def test_compiled_model_trains_like_the_eager_one(demo_dir):
    """torch.compile (on in search_spaces/eva02.yaml) changes speed, not the training or its checkpoints."""
    config = quick_config(demo_dir, epochs=1, augment="none")
    eager, compiled = TrainingRun(config), TrainingRun(dataclasses.replace(config, compile=True))
    [eager_metrics], [compiled_metrics] = list(eager.epochs()), list(compiled.epochs())
    assert compiled_metrics["train_loss"] == pytest.approx(eager_metrics["train_loss"], rel=1e-3)
    assert compiled.state_dict()["model"].keys() == eager.state_dict()["model"].keys()


def test_batch_larger_than_the_data_is_refused(demo_dir):
    with pytest.raises(SketchError, match="batch_size: 1000 per worker exceeds"):
        TrainingRun(quick_config(demo_dir, batch_size=1000))


def _ddp_worker(rank, world_size, port, data_dir, results):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        torch.set_num_threads(1)
        run = TrainingRun(quick_config(data_dir, epochs=2))
        results.put((rank, list(run.epochs()), len(run.train_loader)))
    finally:
        dist.destroy_process_group()


def test_ddp_in_two_processes_reports_the_same_metrics_on_every_rank(demo_dir):
    context = mp.get_context("spawn")
    results = context.Queue()
    mp.start_processes(_ddp_worker, args=(2, free_port(), str(demo_dir), results), nprocs=2,
                       start_method="spawn", join=True)
    by_rank = dict((rank, (history, batches)) for rank, history, batches in (results.get(), results.get()))
    single = len(TrainingRun(quick_config(demo_dir)).train_loader)
    assert by_rank[0][1] == by_rank[1][1] == single // 2  # each rank sees half the batches
    for epoch0, epoch1 in zip(by_rank[0][0], by_rank[1][0]):
        assert set(epoch0) == METRICS
        assert epoch0 == epoch1
