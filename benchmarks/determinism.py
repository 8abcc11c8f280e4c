"""What `train.deterministic` costs: training steps with deterministic kernels against PyTorch's defaults.

The same model and batch take steps in alternating rounds, one round with
`set_deterministic(True)` and one with `False`, so a busy machine slows both alike.

    python benchmarks/determinism.py                      # the embedded default, this machine's device
    python benchmarks/determinism.py -S train.precision=fp32
    python benchmarks/determinism.py -S model.vision.name=google/vit-base-patch16-224-in21k \
        -S model.text.name=bert-base-uncased -S data.img_res=224 -S train.batch_size=32   # ViT-B (on a GPU)
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

from avse.compute import resolve_precision, retain_freed_memory
from avse.config import load_config
from avse.model.avse import build_model
from avse.training.distributed import DistContext
from avse.training.dry_run import random_batch
from avse.training.step import forward_backward, optimizer_step
from avse.training.optim import build_optimizer
from avse.training.seeding import CUBLAS_WORKSPACE, set_deterministic


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-S", "--set", dest="overrides", action="append", default=[], help="parameter override, as in dvc exp run")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds of each setting (after one warm-up round each)")
    parser.add_argument("--steps", type=int, default=3, help="steps per round")
    args = parser.parse_args()
    # cuBLAS reads its workspace setting once, at its first use: set before any round, as training does.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    retain_freed_memory()

    config = load_config(overrides=args.overrides)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ctx = DistContext(rank=0, local_rank=0, world_size=1, device=device)
    dtype = resolve_precision(config.train.precision, device)
    torch.manual_seed(0)
    model = build_model(config, config.data.vocab_size).to(device).train()
    optimizer = build_optimizer(model, config.train)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    batch = random_batch(config, config.data.vocab_size, device)

    def round_seconds(deterministic: bool) -> float:
        set_deterministic(deterministic, device)
        start = time.perf_counter()
        for _ in range(args.steps):
            forward_backward(model, model, batch, ctx, config, epoch=config.train.warmup_epochs, dtype=dtype, scaler=scaler)
            optimizer_step(model, optimizer, scaler, config.train.grad_clip)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - start) / args.steps

    timings: dict[bool, list[float]] = {True: [], False: []}
    for round_index in range(args.rounds + 1):  # round 0 warms up both settings' kernels, untimed
        for deterministic in (False, True):
            seconds = round_seconds(deterministic)
            if round_index:
                timings[deterministic].append(seconds)
    median = {setting: float(np.median(t)) for setting, t in timings.items()}
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"{config.model.vision.name} + {config.model.text.name} at {config.data.img_res}px, batch {config.train.batch_size}, "
          f"{str(dtype).removeprefix('torch.')}, {where}; median of {args.rounds} rounds of {args.steps} steps")
    for setting, label in ((False, "PyTorch defaults"), (True, "train.deterministic: true")):
        print(f"  {label:<32}{median[setting]:8.3f} s/step  {config.train.batch_size / median[setting]:8.1f} pairs/s")
    print(f"  {'cost (deterministic / default)':<32}{median[True] / median[False]:8.3f}x")


if __name__ == "__main__":
    main()
