"""GPU figures in one run of a few minutes: training pairs/s and MFU at the paper's sizes, COCO 5K scoring time.

Training steps are the train stage's own (`forward_backward` + `optimizer_step`) in the
default precision (`train.precision: auto`: bf16 on GPUs that have it), on random inputs
with randomly initialised backbones (the cost does not depend on the weights). FLOPs
per step are counted once with torch's FLOP counter; MFU is achieved FLOP/s over the
device's dense bf16 peak (`--peak-tflops`, or the table below by device name).

    python benchmarks/gpu.py                  # the ViT rows f30k-vit-224 and f30k-vit-384 (per-process batch), COCO 5K
    python benchmarks/gpu.py --tiny           # seconds on a CPU: small models, small matrices
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from avse.compute import resolve_precision
from avse.config import load_config
from avse.experiments import FULL_SIZE_RANDOM, load_experiments
from avse.model.avse import build_model
from avse.model.similarity import meta_similarity
from avse.training.distributed import DistContext
from avse.training.dry_run import random_batch
from avse.training.step import forward_backward, optimizer_step
from avse.training.optim import build_optimizer
from avse.training.seeding import set_deterministic

# Dense bf16 tensor-core peaks (TFLOP/s), by a substring of torch.cuda.get_device_name().
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}
# The paper's ViT rows (experiments.yaml) at full size, one process each, in the default precision.
ROWS = ("f30k-vit-224", "f30k-vit-384")
TINY_RUNS = {"vit-tiny 64, batch 16": ["model.vision.name=vit-tiny", "model.text.name=bert-tiny", "model.embed_size=256",
                                       "model.block_dim=64", "data.img_res=64", "train.batch_size=16", "train.loss=hinge"]}
COCO_5K = (5000, 25000)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def training(overrides: list[str], steps: int, device: torch.device) -> dict[str, float]:
    """pairs/s and FLOPs per step of the train stage's step at the configured size."""
    config = load_config(Path(__file__).resolve().parents[1] / "params.yaml", overrides)
    ctx = DistContext(rank=0, local_rank=0, world_size=1, device=device)
    dtype = resolve_precision(config.train.precision, device)
    set_deterministic(config.train.deterministic, device)  # the kernels training runs (SDPA's math path by default)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)  # each configuration's own peak
    model = build_model(config, config.data.vocab_size).to(device).train()
    optimizer = build_optimizer(model, config.train)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    batch = random_batch(config, config.data.vocab_size, device)

    def step() -> None:
        forward_backward(model, model, batch, ctx, config, epoch=1, dtype=dtype, scaler=scaler)
        optimizer_step(model, optimizer, scaler, config.train.grad_clip)

    with FlopCounterMode(display=False) as counter:  # also the warm-up step
        step()
    step()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    seconds = (time.perf_counter() - start) / steps
    return {"pairs_per_s": config.train.batch_size / seconds, "flops": counter.get_total_flops(), "seconds": seconds,
            "dtype": str(dtype).removeprefix("torch.")}


def scoring_seconds(images: int, captions: int, device: torch.device, chunk_size: int = 256) -> float:
    """Exact AVSE scoring of `images x captions` (2 views of 1024, 256-d blocks) on `device`."""
    img = torch.randn(images, 2 * 1024, device=device)
    cap = torch.randn(captions, 1024, device=device)
    with torch.no_grad():
        meta_similarity(img[:chunk_size], cap[:chunk_size], 256, chunk_size)  # warm-up
        synchronize(device)
        start = time.perf_counter()
        meta_similarity(img, cap, 256, chunk_size)
        synchronize(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="small models and matrices: a quick check on a CPU")
    parser.add_argument("--steps", type=int, default=10, help="timed training steps per configuration")
    parser.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak, for MFU")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    if args.tiny:
        runs = TINY_RUNS
    else:
        experiments = load_experiments(Path(__file__).resolve().parents[1] / "experiments.yaml")
        runs = {f"{name}, batch {experiments[name].settings['train.batch_size']}":
                [*experiments[name].overrides(), *FULL_SIZE_RANDOM, "train.precision=auto", "train.nproc_per_node=1"] for name in ROWS}
    print(f"device: {name}, torch {torch.__version__}")
    for label, overrides in runs.items():
        result = training(overrides, args.steps, device)
        tflops = result["flops"] / result["seconds"] / 1e12
        mfu = f"{tflops / peak:.1%}" if peak else "n/a (no known peak: --peak-tflops)"
        memory = f", peak memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB" if device.type == "cuda" else ""
        print(f"train {label}: {result['pairs_per_s']:.1f} pairs/s in {result['dtype']}, {result['seconds'] * 1000:.0f} ms/step, "
              f"{result['flops'] / 1e12:.3f} TFLOP/step, {tflops:.2f} TFLOP/s, MFU {mfu}{memory}")
    images, captions = (200, 1000) if args.tiny else COCO_5K
    print(f"score {images} x {captions} (COCO 5K: 2 views x 1024, 256-d blocks): {scoring_seconds(images, captions, device):.2f} s")


if __name__ == "__main__":
    main()
