"""Training throughput of one GPU on the competition's backbone, and its share of the GPU's peak.

    python bench/gpu_throughput.py                       # EVA02-L at 448 px, batch 32, on CUDA
    python bench/gpu_throughput.py --no-compile --steps 10
    python bench/gpu_throughput.py --model test_vit --image-size 64 --device cpu   # smoke run

Measures the train step the engine runs on a GPU (sketch_core's classifier with a 500-class head,
bf16 autocast, fused AdamW, label-smoothed cross-entropy) on batches already on the GPU, so the
figures are the model's compute alone; bench/dataloader.py measures the input side. Variants, in
this order: eager, eager with channels-last, and ``torch.compile`` with the faster layout.

FLOPs per image are counted once with torch's FlopCounterMode (forward and backward). The share
of peak is given against the GPU's dense bf16 figure from its data sheet (H100/H200/A100, or
``--peak-tflops``) and against an 8192^3 bf16 matrix product measured in the same run.
The last line printed is one JSON object with the figures (also written to ``--json-out``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import torch  # noqa: E402
from timm.optim import create_optimizer_v2  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from sketch_core.models import create_classifier  # noqa: E402

# Dense bf16 tensor-core TFLOP/s from NVIDIA's data sheets (SXM parts), by a name fragment.
DATASHEET_BF16_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0}


def build(args, *, channels_last: bool, compile_model: bool, device: torch.device):
    model = create_classifier(args.model, num_classes=args.classes, pretrained=False).to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = create_optimizer_v2(model, opt="adamw", lr=1e-4, weight_decay=0.05,
                                    **({"fused": True} if device.type == "cuda" else {}))
    step_model = torch.compile(model) if compile_model else model
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)
    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    targets = torch.randint(0, args.classes, (args.batch_size,), device=device)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = loss_fn(step_model(images), targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(args, name: str, device: torch.device, *, channels_last: bool, compile_model: bool) -> dict:
    started = time.perf_counter()
    step = build(args, channels_last=channels_last, compile_model=compile_model, device=device)
    for _ in range(args.warmup):  # the first steps of a compiled model include the compilation
        step()
    synchronize(device)
    warm_s = time.perf_counter() - started
    started = time.perf_counter()
    for _ in range(args.steps):
        step()
    synchronize(device)
    step_s = (time.perf_counter() - started) / args.steps
    row = {"variant": name, "images_per_s": args.batch_size / step_s, "step_ms": step_s * 1000,
           "warmup_s": warm_s,
           "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0}
    del step
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    print(f"{name:<24} {row['images_per_s']:8.1f} img/s  {row['step_ms']:8.1f} ms/step  "
          f"warm-up {warm_s:6.1f} s  peak mem {row['peak_mem_gib']:5.1f} GiB", flush=True)
    return row


def train_flops_per_image(args, device: torch.device) -> float:
    """FLOPs of one training step (forward + backward) per image, counted on a batch of 2."""
    model = create_classifier(args.model, num_classes=args.classes, pretrained=False).to(device)
    images = torch.randn(2, 3, args.image_size, args.image_size, device=device)
    counter = FlopCounterMode(display=False)
    with counter, torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        model(images).float().sum().backward()
    del model
    return counter.get_total_flops() / 2


def matmul_tflops(device: torch.device, size: int = 8192, repeats: int = 10) -> float:
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    synchronize(device)
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    synchronize(device)
    return 2 * size**3 * repeats / (time.perf_counter() - started) / 1e12


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="eva02_large_patch14_448.mim_m38m_ft_in22k_in1k")
    parser.add_argument("--image-size", type=int, default=448)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--classes", type=int, default=500)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps per variant (compilation included)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    parser.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak, if not in the data-sheet table")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("error: no CUDA GPU here; this benchmark measures GPU training (--device cpu for a smoke run)")
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    torch.backends.cuda.matmul.allow_tf32 = True
    print(f"{args.model} at {args.image_size} px, batch {args.batch_size}, {args.classes} classes, on {gpu}",
          flush=True)

    flops_per_image = train_flops_per_image(args, device)
    rows = [measure(args, "eager", device, channels_last=False, compile_model=False),
            measure(args, "eager, channels-last", device, channels_last=True, compile_model=False)]
    channels_last = rows[1]["images_per_s"] > rows[0]["images_per_s"]
    if not args.no_compile:
        rows.append(measure(args, "compiled" + (", channels-last" if channels_last else ""), device,
                            channels_last=channels_last, compile_model=True))
    best = max(rows, key=lambda row: row["images_per_s"])
    achieved = best["images_per_s"] * flops_per_image / 1e12
    peak = args.peak_tflops or next((tflops for name, tflops in DATASHEET_BF16_TFLOPS.items() if name in gpu), None)
    measured_peak = matmul_tflops(device) if device.type == "cuda" else None
    print(f"train step: {flops_per_image / 1e12:.3f} TFLOP per image; best ({best['variant']}): "
          f"{achieved:.0f} TFLOP/s of {peak or 'unknown'} (data sheet), "
          f"{measured_peak or float('nan'):.0f} (8192^3 bf16 matmul here)", flush=True)

    figures = {
        "model": args.model, "image_size": args.image_size, "batch_size": args.batch_size, "gpu": gpu,
        "torch": torch.__version__,
        **{f"{row['variant'].replace(', ', '_').replace('-', '_')}_images_per_s": round(row["images_per_s"], 1)
           for row in rows},
        "compile_speedup": round(rows[2]["images_per_s"] / rows[int(channels_last)]["images_per_s"], 3)
        if len(rows) == 3 else None,
        "channels_last_speedup": round(rows[1]["images_per_s"] / rows[0]["images_per_s"], 3),
        "best_images_per_s": round(best["images_per_s"], 1),
        "train_tflop_per_image": round(flops_per_image / 1e12, 4),
        "achieved_tflops": round(achieved, 1),
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
