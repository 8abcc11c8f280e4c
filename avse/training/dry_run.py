"""`avse train --dry-run`: the configured model and optimiser on random inputs of the configured shape.

Validates a configuration (does it build, fit in memory, how fast is a step) before
any GPU hours are spent; needs no dataset and no download for `init: random`.
"""

from __future__ import annotations

import resource
import time

import torch

from avse.compute import resolve_precision, retain_freed_memory, set_threads
from avse.config import Config
from avse.model import backbones
from avse.model.avse import build_model
from avse.training.distributed import DistContext, init_distributed
from avse.training.step import forward_backward, optimizer_step
from avse.training.optim import build_optimizer
from avse.training.seeding import set_deterministic


def random_batch(config: Config, vocab_size: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """uint8 images `[b, 3, R, R]`, token ids and mask `[b, L]`, distinct image groups `[b]`.

    L is `model.text.max_len`; with 0 (no truncation), the text backbone's position limit: the worst case.
    """
    b, res, length = config.train.batch_size, config.data.img_res, config.model.text.max_len
    if length == 0:
        length = backbones.load_config(config.model.text, "model.text", ("bert",))[1].max_position_embeddings
    images = torch.randint(0, 256, (b, 3, res, res), dtype=torch.uint8, device=device)
    input_ids = torch.randint(5, vocab_size, (b, length), device=device)
    return images, input_ids, torch.ones_like(input_ids), torch.arange(b, device=device)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def dry_run(config: Config, steps: int) -> dict[str, float]:
    retain_freed_memory()  # as the train stage does
    ctx: DistContext = init_distributed()
    set_threads(config.train.threads)  # as the train stage does
    dtype = resolve_precision(config.train.precision, ctx.device)
    set_deterministic(config.train.deterministic, ctx.device)  # timed as training runs
    vocab_size = config.data.vocab_size
    model = build_model(config, vocab_size).to(ctx.device).train()
    if config.model.text.init == "pretrained":
        vocab_size = model.text_encoder.backbone.config.vocab_size
    optimizer = build_optimizer(model, config.train)
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=dtype == torch.float16)
    batch = random_batch(config, vocab_size, ctx.device)
    timings = []
    for step in range(steps + 1):  # the first step warms up kernels and allocators, untimed
        start = time.perf_counter()
        forward_backward(model, model, batch, ctx, config, epoch=config.train.warmup_epochs, dtype=dtype, scaler=scaler)
        if step == 0:  # before the optimiser allocates its state: weights, gradients and the activations' peak
            backward_peak = peak_memory_mb(ctx.device)
        optimizer_step(model, optimizer, scaler, config.train.grad_clip)
        if ctx.device.type == "cuda":
            torch.cuda.synchronize()
        timings.append(time.perf_counter() - start)
    seconds = sum(timings[1:]) / steps
    params = {
        "vision": sum(p.numel() for p in model.image_encoder.backbone.parameters()),
        "text": sum(p.numel() for p in model.text_encoder.backbone.parameters()),
        "total": sum(p.numel() for p in model.parameters()),
    }
    report = {
        "params_vision_m": params["vision"] / 1e6, "params_text_m": params["text"] / 1e6, "params_total_m": params["total"] / 1e6,
        "seconds_per_step": seconds, "pairs_per_s": config.train.batch_size / seconds, "peak_memory_mb": peak_memory_mb(ctx.device),
        "backward_peak_mb": backward_peak,
    }
    print(f"dry run: {config.model.vision.name} + {config.model.text.name} at {config.data.img_res}px, "
          f"batch {config.train.batch_size}, {str(dtype).removeprefix('torch.')} on {ctx.device}")
    print(f"  parameters   {report['params_total_m']:.1f}M (vision {report['params_vision_m']:.1f}M, text {report['params_text_m']:.1f}M)")
    print(f"  step         {seconds:.3f} s ({steps} timed steps)")
    print(f"  throughput   {report['pairs_per_s']:.1f} pairs/s")
    print(f"  peak memory  {report['peak_memory_mb']:.0f} MB ({backward_peak:.0f} MB by the first backward pass, "
          "before the optimiser's state)")
    return report
