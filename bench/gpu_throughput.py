"""Training throughput of one GPU on the competition's backbone, and its share of the GPU's peak.

    python bench/gpu_throughput.py                       # EVA02-L at 448 px, batch 32, on CUDA
    python bench/gpu_throughput.py --no-compile --steps 10
    python bench/gpu_throughput.py --batch-size 16 --set mixup_alpha=0.8 --set cutmix_alpha=1.0
    python bench/gpu_throughput.py --quick               # smoke run: test_vit at 32 px (on the CPU
                                                         # without a GPU)

Times ``TrainingRun.train_step`` (sketch_core/engine.py), the step every trial runs on each
batch, built from a space file's settings (default search_spaces/eva02.yaml: AdamW, fused on
CUDA, bf16 autocast, gradient clipping, drop-path, label smoothing, the warm-up and cosine
schedule) with random weights (``pretrained: false``: the same compute, nothing downloaded) and
a 500-class head. It is fed synthetic batches already on the device, as the train loader hands
them over, so the figures are the model's compute alone; bench/dataloader.py measures the input
side. ``--set FIELD=VALUE`` changes any other TrainConfig field. Variants, in this order: eager,
eager with channels-last, and ``torch.compile`` with the faster layout. Each variant's warm-up
steps are untimed; for the compiled one their time beyond that many timed steps is reported as
its compilation.

FLOPs per image are counted once with torch's FlopCounterMode over one eager ``train_step``
(forward and backward). The share of peak is given against the GPU's dense bf16 figure from its
data sheet (H100/H200/A100, or ``--peak-tflops``) and against an 8192^3 bf16 matrix product
measured in the same run. The last line printed is one JSON object with the figures (also
written to ``--json-out``).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils import benchmark
from torch.utils.flop_counter import FlopCounterMode

from ray_jobs.space import load_space
from sketch_core.config import TrainConfig
from sketch_core.data import TrainTable
from sketch_core.engine import TrainingRun
from sketch_core.errors import SketchError

REPO_ROOT = Path(__file__).resolve().parents[1]

# Dense bf16 tensor-core TFLOP/s from NVIDIA's data sheets (SXM parts), by a name fragment.
DATASHEET_BF16_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0}
QUICK = {
    "model": "test_vit",
    "image_size": 32,
    "batch_size": 4,
    "classes": 10,
    "steps": 3,
    "warmup": 1,
    "no_compile": True,
}


class Workload:
    """What every variant trains on: the configuration, a table that sizes the head and the
    schedule, and one synthetic batch."""

    def __init__(self, config: TrainConfig, classes: int, steps_per_run: int, device: torch.device):
        self.config, self.device = config, device
        self.table = synthetic_table(classes, rows=config.batch_size * steps_per_run)
        # As PrefetchLoader hands a batch over: normalised float32, NCHW, on the device.
        self.images = torch.randn(
            config.batch_size, 3, config.image_size, config.image_size, device=device
        )
        self.targets = torch.randint(0, classes, (config.batch_size,), device=device)

    def run(self, **changes) -> TrainingRun:
        return TrainingRun(self.config.replace(**changes), device=self.device, table=self.table)

    def step(self, run: TrainingRun) -> None:
        run.train_step(self.images, self.targets)


def synthetic_table(classes: int, rows: int) -> TrainTable:
    """A train table whose images are never read (the batches are synthetic): it gives the head its
    classes and the train loader its length, so that every step benchmarked falls in one epoch."""
    targets = np.arange(rows) % classes
    class_names = [f"class_{target}" for target in range(classes)]
    paths = [f"synthetic/{row}.JPEG" for row in range(rows)]
    frame = pd.DataFrame(
        {"class_name": [class_names[t] for t in targets], "image_path": paths, "target": targets}
    )
    return TrainTable(frame=frame, paths=paths, targets=targets, class_names=class_names)


def measure(
    workload: Workload, name: str, args, *, channels_last: bool, compile_model: bool
) -> dict:
    device = workload.device
    if (
        device.type == "cuda"
    ):  # the peak of this variant alone: the previous run's memory freed first
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    run = workload.run(channels_last=channels_last, compile=compile_model)
    started = benchmark.timer()  # waits for the device, as every reading below
    for _ in range(args.warmup):  # the first steps of a compiled model include the compilation
        workload.step(run)
    warmup_s = benchmark.timer() - started
    started = benchmark.timer()
    for _ in range(args.steps):
        workload.step(run)
    step_s = (benchmark.timer() - started) / args.steps
    row = {
        "variant": name,
        "images_per_s": workload.config.batch_size / step_s,
        "step_ms": step_s * 1000,
        "warmup_s": warmup_s,
        "compile_s": max(warmup_s - args.warmup * step_s, 0.0) if compile_model else None,
        "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30
        if device.type == "cuda"
        else 0.0,
    }
    compiled = f"  compile {row['compile_s']:6.1f} s" if compile_model else ""
    print(
        f"{name:<24} {row['images_per_s']:8.1f} img/s  {row['step_ms']:8.1f} ms/step  "
        f"warm-up {warmup_s:6.1f} s{compiled}  peak mem {row['peak_mem_gib']:5.1f} GiB",
        flush=True,
    )
    return row


def train_flops_per_image(workload: Workload) -> float:
    """FLOPs of one eager train step (forward + backward) per image."""
    run = workload.run(channels_last=False, compile=False)
    counter = FlopCounterMode(display=False)
    with counter:
        workload.step(run)
    return counter.get_total_flops() / workload.config.batch_size


def matmul_tflops(device: torch.device, size: int = 8192, repeats: int = 10) -> float:
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    started = benchmark.timer()
    for _ in range(repeats):
        a @ b
    return 2 * size**3 * repeats / (benchmark.timer() - started) / 1e12


def benchmark_config(args) -> TrainConfig:
    """The space's settings for a trial, with this benchmark's model and batch; the data loading
    settings are moot (nothing is loaded) and set so that building the run reads no file."""
    base = load_space(args.space).base
    return TrainConfig.from_dict(
        {
            **base,
            "model": args.model or base["model"],
            "image_size": args.image_size or base["image_size"],
            "batch_size": args.batch_size,
            "pretrained": False,
            "checkpoint_file": "",
            "data_dir": "",
            "val_fraction": 0.0,
            "folds": 0,
            "decode_cache": False,
            "num_workers": 0,
            **dict(args.set),
        },
        source="gpu_throughput",
    )


def field_setting(text: str) -> tuple[str, str]:
    name, equals, value = text.partition("=")
    if not equals:
        raise argparse.ArgumentTypeError(f"expected FIELD=VALUE, got {text!r}")
    return name, value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--space",
        type=Path,
        default=REPO_ROOT / "search_spaces" / "eva02.yaml",
        help="the space file whose settings a trial trains with",
    )
    parser.add_argument("--model", help="default: the space's model")
    parser.add_argument("--image-size", type=int, help="default: the space's image size")
    parser.add_argument("--batch-size", type=int, default=32, help="per GPU")
    parser.add_argument("--classes", type=int, default=500)
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        type=field_setting,
        metavar="FIELD=VALUE",
        help="any other TrainConfig field (repeatable)",
    )
    parser.add_argument("--steps", type=int, default=20, help="timed steps per variant")
    parser.add_argument(
        "--warmup", type=int, default=5, help="untimed steps per variant (compilation included)"
    )
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke run: {', '.join(f'{key}={value}' for key, value in QUICK.items())}",
    )
    parser.add_argument(
        "--peak-tflops",
        type=float,
        help="the GPU's dense bf16 peak, if not in the data-sheet table",
    )
    parser.add_argument(
        "--device", help="default: cuda (with --quick, the CPU where there is no GPU)"
    )
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args(argv)
    if args.quick:
        vars(args).update(QUICK)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device(
        args.device or ("cuda" if torch.cuda.is_available() or not args.quick else "cpu")
    )
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit(
            "error: no CUDA GPU here; this benchmark measures GPU training "
            "(--quick for a smoke run on the CPU)"
        )
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    try:
        config = benchmark_config(args)
    except SketchError as exc:
        sys.exit(f"error: {exc}")
    workload = Workload(config, args.classes, steps_per_run=args.warmup + args.steps, device=device)
    print(
        f"TrainingRun.train_step: {config.model} at {config.image_size} px, "
        f"batch {config.batch_size}, "
        f"{args.classes} classes, {config.optimizer}, grad_clip {config.grad_clip}, "
        f"{'bf16 autocast' if config.amp and device.type == 'cuda' else 'fp32'}, on {gpu}",
        flush=True,
    )

    flops_per_image = train_flops_per_image(workload)
    rows = [
        measure(workload, "eager", args, channels_last=False, compile_model=False),
        measure(workload, "eager, channels-last", args, channels_last=True, compile_model=False),
    ]
    channels_last = rows[1]["images_per_s"] > rows[0]["images_per_s"]
    if not args.no_compile:
        rows.append(
            measure(
                workload,
                "compiled" + (", channels-last" if channels_last else ""),
                args,
                channels_last=channels_last,
                compile_model=True,
            )
        )
    best = max(rows, key=lambda row: row["images_per_s"])
    achieved = best["images_per_s"] * flops_per_image / 1e12
    peak = args.peak_tflops or next(
        (tflops for name, tflops in DATASHEET_BF16_TFLOPS.items() if name in gpu), None
    )
    measured_peak = matmul_tflops(device) if device.type == "cuda" else None
    print(
        f"train step: {flops_per_image / 1e12:.3g} TFLOP per image; best ({best['variant']}): "
        f"{achieved:.3g} TFLOP/s of {peak or 'unknown'} (data sheet), "
        f"{measured_peak or float('nan'):.0f} (8192^3 bf16 matmul here)",
        flush=True,
    )

    figures = {
        "step": "TrainingRun.train_step",
        "space": str(args.space),
        "model": config.model,
        "image_size": config.image_size,
        "batch_size": config.batch_size,
        "grad_clip": config.grad_clip,
        "amp": config.amp and device.type == "cuda",
        "gpu": gpu,
        "torch": torch.__version__,
        **{
            f"{row['variant'].replace(', ', '_').replace('-', '_')}_images_per_s": round(
                row["images_per_s"], 1
            )
            for row in rows
        },
        "compile_speedup": round(
            rows[2]["images_per_s"] / rows[int(channels_last)]["images_per_s"], 3
        )
        if len(rows) == 3
        else None,
        "compile_s": round(rows[2]["compile_s"], 1) if len(rows) == 3 else None,
        "channels_last_speedup": round(rows[1]["images_per_s"] / rows[0]["images_per_s"], 3),
        "best_images_per_s": round(best["images_per_s"], 1),
        "train_tflop_per_image": float(f"{flops_per_image / 1e12:.4g}"),
        "achieved_tflops": float(f"{achieved:.4g}"),
        "peak_bf16_tflops": peak,
        "share_of_peak": round(achieved / peak, 3) if peak else None,
        "matmul_tflops": round(measured_peak, 1) if measured_peak else None,
        "share_of_matmul": round(achieved / measured_peak, 3) if measured_peak else None,
        "peak_mem_gib": round(max(row["peak_mem_gib"] for row in rows), 1),
    }
    line = json.dumps(figures)
    if args.json_out:
        args.json_out.write_text(line + "\n")
    print(line)


if __name__ == "__main__":
    main()
