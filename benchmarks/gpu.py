"""GPU figures in one run of a few minutes: training pairs/s and MFU at the paper's sizes, COCO 5K scoring time.

Training steps are the train stage's own (`forward_backward` + `optimizer_step`) in the
default precision (`train.precision: auto`: bf16 on GPUs that have it), on random inputs
with randomly initialised backbones (the cost does not depend on the weights). FLOPs
per step are counted once with torch's FLOP counter; MFU is achieved FLOP/s over the
device's dense bf16 peak (`--peak-tflops`, or `peak_tflops` by device name). Each
configuration's peak memory is its own: the one before it is freed first.

    python benchmarks/gpu.py                  # the ViT rows f30k-vit-224 and f30k-vit-384 (per-process batch), COCO 5K
    python benchmarks/gpu.py --tiny           # seconds on a CPU: small models, small matrices
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from torch._dynamo.utils import clear_compilation_metrics, get_compilation_metrics
from torch.utils.flop_counter import FlopCounterMode

from avse.compute import resolve_precision
from avse.config import Config, load_config
from avse.experiments import FULL_SIZE_RANDOM, load_experiments
from avse.model.avse import build_model
from avse.model.similarity import meta_similarity
from avse.training.distributed import DistContext
from avse.training.dry_run import random_batch
from avse.training.step import forward_backward, optimizer_step
from avse.training.optim import build_optimizer
from avse.training.seeding import set_deterministic

# Dense bf16 tensor-core peaks (TFLOP/s) by a substring of torch.cuda.get_device_name(), the first match counts:
# "NVIDIA H100 PCIe" and "NVIDIA H100 NVL" contain "H100" too, which alone is the SXM part ("NVIDIA H100 80GB HBM3").
PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0), ("L40S", 362.0))
# The paper's ViT rows (experiments.yaml) at full size, one process each, in the default precision.
ROWS = ("f30k-vit-224", "f30k-vit-384")
TINY_RUNS = {"vit-tiny 64, batch 16": ["model.vision.name=vit-tiny", "model.text.name=bert-tiny", "model.embed_size=256",
                                       "model.block_dim=64", "data.img_res=64", "train.batch_size=16", "train.loss=hinge"]}
COCO_5K = (5000, 25000)
SHOWN_SYNCHRONIZATIONS = 5


def peak_tflops(device_name: str) -> float | None:
    """The device's dense bf16 peak in TFLOP/s, None for a device not in `PEAK_TFLOPS`."""
    return next((peak for part, peak in PEAK_TFLOPS if part in device_name), None)


def mfu_text(mfu: float | None, device_name: str) -> str:
    return f"{mfu:.1%}" if mfu is not None else f"n/a (unknown device {device_name}: --peak-tflops)"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release(device: torch.device) -> None:
    """Frees what an earlier configuration built. `Module.compile` leaves a reference cycle (the module holds its
    compiled call, which holds the module), so a model lives until a full collection; Dynamo keeps its compiled frames,
    which also count towards the next configuration's recompile limit, until reset."""
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


@contextlib.contextmanager
def compilations() -> Iterator[dict]:
    """What torch.compile did inside the block: frames compiled, recompilations, and whether a frame fell back to
    eager, which Dynamo does with no more than a logged warning for a frame past `torch._dynamo.config.recompile_limit`
    or one it cannot trace. Read from Dynamo's compilation metrics, which keep its last 64 frame compilations."""
    clear_compilation_metrics()
    report: dict = {}
    yield report
    # Backward graphs and runtime events are recorded alongside the frames Dynamo compiled.
    frames = [m for m in get_compilation_metrics() if m.is_forward is not False and not m.is_runtime]
    compiled = [m for m in frames if m.has_guarded_code]
    failures = list(dict.fromkeys(" ".join((m.fail_reason or m.fail_type).split("Hint:")[0].split()) for m in frames if m.fail_type))
    reasons = list(dict.fromkeys(" ".join(m.recompile_reason.splitlines()[0].split()) for m in frames if m.recompile_reason))
    report |= {"frames_compiled": len(compiled), "recompiles": sum(m.recompile_reason is not None for m in compiled),
               "recompile_reasons": reasons, "fell_back_to_eager": bool(failures), "fallback_reasons": failures}


@contextlib.contextmanager
def host_synchronizations(device: torch.device) -> Iterator[dict]:
    """On a GPU, the synchronisations inside the block (torch's sync debug mode, "warn"): how many, and the first
    distinct ones with where they come from. A training step has one by design (`optimizer_step` decides on the
    host whether the gradients are finite); any other stalls the host while the device catches up."""
    report: dict = {}
    if device.type != "cuda":
        yield report
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # every occurrence, not the first per location
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield report
        finally:
            torch.cuda.set_sync_debug_mode(0)
    syncs = [w for w in caught if "synchronizing" in str(w.message)]
    distinct = dict.fromkeys(f"{w.filename}:{w.lineno}: {str(w.message).splitlines()[0]}" for w in syncs)
    report |= {"count": len(syncs), "first": list(distinct)[:SHOWN_SYNCHRONIZATIONS]}


def training(overrides: list[str], steps: int, device: torch.device) -> dict:
    """pairs/s, FLOPs per step, peak memory and the last step's objective of the train stage's step at the
    configured size, and on a GPU the host synchronisations of the timed steps. Each configuration starts from a
    freed device and Dynamo and leaves them so: its peak memory and compilations are its own."""
    config = load_config(Path(__file__).resolve().parents[1] / "params.yaml", overrides)
    release(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        return timed_steps(config, steps, device) | {"peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30
                                                     if device.type == "cuda" else None}
    finally:
        release(device)


def timed_steps(config: Config, steps: int, device: torch.device) -> dict:
    """What `training` measures; the model and optimiser die with this call."""
    ctx = DistContext(rank=0, local_rank=0, world_size=1, device=device)
    dtype = resolve_precision(config.train.precision, device)
    set_deterministic(config.train.deterministic, device)  # the kernels training runs (SDPA's math path by default)
    model = build_model(config, config.data.vocab_size).to(device).train()
    optimizer = build_optimizer(model, config.train)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    batch = random_batch(config, config.data.vocab_size, device)

    def step() -> torch.Tensor:
        objective, _ = forward_backward(model, model, batch, ctx, config, epoch=1, dtype=dtype, scaler=scaler)
        optimizer_step(model, optimizer, scaler, config.train.grad_clip, objective)
        return objective

    # Eager, compiled blocks included: Dynamo skips a frame under the FLOP counter (a dispatch mode) and would
    # never compile its code afterwards.
    with torch.compiler.set_stance("force_eager"), FlopCounterMode(display=False) as counter:
        step()
    step()  # warm-up: compilation, allocator growth
    synchronize(device)
    start = time.perf_counter()
    with host_synchronizations(device) as synchronizations:
        for _ in range(steps):
            objective = step()
    synchronize(device)
    seconds = (time.perf_counter() - start) / steps
    return {"pairs_per_s": config.train.batch_size / seconds, "flops": counter.get_total_flops(), "seconds": seconds,
            "dtype": str(dtype).removeprefix("torch."), "objective": float(objective)} | (
        {"host_synchronizations": synchronizations} if device.type == "cuda" else {})


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
    peak = args.peak_tflops or peak_tflops(name)
    if args.tiny:
        runs = TINY_RUNS
    else:
        experiments = load_experiments(Path(__file__).resolve().parents[1] / "experiments.yaml")
        runs = {f"{row}, batch {experiments[row].settings['train.batch_size']}":
                [*experiments[row].overrides(), *FULL_SIZE_RANDOM, "train.precision=auto", "train.nproc_per_node=1"] for row in ROWS}
    print(f"device: {name}, torch {torch.__version__}")
    for label, overrides in runs.items():
        result = training(overrides, args.steps, device)
        tflops = result["flops"] / result["seconds"] / 1e12
        memory = f", peak memory {result['peak_memory_gib']:.1f} GiB" if result["peak_memory_gib"] is not None else ""
        syncs = f", {result['host_synchronizations']['count']} host synchronisations" if "host_synchronizations" in result else ""
        mfu = mfu_text(tflops / peak if peak else None, name)
        print(f"train {label}: {result['pairs_per_s']:.1f} pairs/s in {result['dtype']}, {result['seconds'] * 1000:.0f} ms/step, "
              f"{result['flops'] / 1e12:.3f} TFLOP/step, {tflops:.2f} TFLOP/s, MFU {mfu}{memory}{syncs}")
        for where in result.get("host_synchronizations", {}).get("first", []):
            print(f"  synchronisation at {where}")
    images, captions = (200, 1000) if args.tiny else COCO_5K
    print(f"score {images} x {captions} (COCO 5K: 2 views x 1024, 256-d blocks): {scoring_seconds(images, captions, device):.2f} s")


if __name__ == "__main__":
    main()
