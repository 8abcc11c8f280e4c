"""One training step (forward, loss, backward, optimiser) and the dev evaluation: what the loop, the dry run and
the benchmarks run alike."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from avse.compute import autocast
from avse.config import Config
from avse.data.dataset import PreparedSplit
from avse.data.tokenizer import CaptionTokenizer
from avse.errors import AvseError
from avse.evaluation.diagnostics import block_diagnostics
from avse.evaluation.embed import encode_captions, encode_images
from avse.evaluation.recall import recall_metrics
from avse.model.avse import AVSE, parameters_without_gradient
from avse.training.distributed import DistContext, all_reduce_sum
from avse.training.objective import contrastive_loss


class TrainingError(AvseError):
    """Training cannot go on (e.g. too many consecutive non-finite losses)."""


@dataclass(frozen=True)
class Verdict:
    """What the device says of an optimiser step, read once: were the gradients applied, must training stop?"""

    applied: bool
    stop: bool


def forward_backward(
    ddp_model: torch.nn.Module, model: AVSE, batch: tuple[Tensor, ...], ctx: DistContext, config: Config,
    epoch: int, dtype: torch.dtype, scaler: torch.amp.GradScaler, loss_scale: float = 1.0, stop: bool = False,
) -> tuple[Tensor, Tensor]:
    """One micro-batch: forward, loss and backward. Returns the global objective and how many processes asked to
    `stop` (a stop signal arrived), scalars left on the device: reading them here would make the host wait for the
    device at every micro-batch. A non-finite objective is back-propagated like any other; `optimizer_step` then
    skips the step."""
    images, input_ids, attention_mask, groups = (t.to(ctx.device, non_blocking=True) for t in batch)
    with autocast(ctx.device, dtype, config.train.deterministic):
        img, cap = ddp_model(images, input_ids, attention_mask)
    loss = contrastive_loss(model, img, cap, groups, ctx, config, epoch)
    # Averaged although every rank computed the same value: a kernel's last bits may differ between devices, and all
    # ranks must take the same decisions in `optimizer_step`. The stop requests travel in the same all-reduce.
    summed = all_reduce_sum(torch.stack([loss.detach().float(), loss.new_full((), float(stop), dtype=torch.float32)]), ctx)
    scaler.scale(loss * loss_scale).backward()
    return summed[0] / ctx.world_size, summed[1]


def optimizer_step(model: AVSE, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, grad_clip: float,
                   objective: Tensor | None = None, stop_requests: Tensor | None = None) -> Verdict:
    """Clip and apply the accumulated gradients, unless they, or the summed `objective` of their micro-batches, are
    not finite; and whether a process asked to stop (`stop_requests` > 0). The verdict is the one place where a
    training step waits for the device."""
    if missing := parameters_without_gradient(model):
        # Under DistributedDataParallel the next step would stop with "Expected to have finished reduction".
        raise TrainingError(
            f"{len(missing)} trainable parameters got no gradient ({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}): "
            "the model builds a part this configuration does not use without freezing it (AVSE.unused_parameters)"
        )
    scaler.unscale_(optimizer)  # clip the true gradients, not the fp16-scaled ones; records non-finite ones for `update`
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else float("inf"))
    finite = torch.isfinite(norm) if objective is None else torch.isfinite(norm) & torch.isfinite(objective)
    stop = torch.zeros((), dtype=torch.bool, device=norm.device) if stop_requests is None else stop_requests > 0
    # Gradients are identical on every rank after DDP's all-reduce, and so are the objective and the stop requests,
    # so all ranks decide alike.
    applied, stopping = torch.stack([finite, stop]).tolist()
    if applied:
        # What `scaler.step` does once the gradients are unscaled and found finite, without reading them again.
        optimizer.step()
    scaler.update()  # under fp16, lowers the loss scale after non-finite gradients; otherwise nothing
    optimizer.zero_grad(set_to_none=True)
    return Verdict(applied, stopping)


def evaluate_split(model: AVSE, split: PreparedSplit, tokenize: CaptionTokenizer, config: Config, device: torch.device, dtype: torch.dtype) -> dict[str, float]:
    """Recall metrics of the model on a prepared evaluation split (5 captions per image), and AVSE's diagnostics
    of the same embeddings (`avse/evaluation/diagnostics.py`)."""
    img = encode_images(model, split, config.data.img_res, config.embed.batch_size, device, dtype, resize=config.data.resize)
    cap = encode_captions(model, split.captions, tokenize, config.embed.batch_size, device, dtype)
    with torch.no_grad():
        sims = model.similarity(img.to(device), cap.to(device), chunk_size=config.eval.chunk_size)
    return recall_metrics(sims.cpu()) | block_diagnostics(img, cap, model.block_dim, model.image_encoder.views,
                                                               torch.from_numpy(split.caption_image))
