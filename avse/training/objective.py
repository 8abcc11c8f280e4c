"""The training objective of one rank's share of a global batch."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from avse.config import Config
from avse.model.avse import AVSE
from avse.model.losses import hinge_triplet_loss, infonce_loss, multi_view_decorrelation
from avse.training.distributed import DistContext, gather_with_grad


def contrastive_loss(model: AVSE, img: Tensor, cap: Tensor, groups: Tensor, ctx: DistContext, config: Config, epoch: int) -> Tensor:
    """This rank's share of the objective, scaled so that summing over ranks and averaging gradients is exact.

    img `[b, V * E]`, cap `[b, E]`, groups `[b]` (image ids) are the local batch. The
    similarity is computed on the gathered global batch `[B, B]`; this rank's queries are
    its own images (rows) and its own captions (columns).
    """
    train = config.train
    all_img = gather_with_grad(img.float(), ctx)  # [B, V * E]
    all_cap = gather_with_grad(cap.float(), ctx)  # [B, E]
    all_groups = _gather_ints(groups, ctx) if ctx.distributed else groups  # [B]
    b = img.size(0)
    local = slice(ctx.rank * b, (ctx.rank + 1) * b)
    positive = torch.arange(b, device=img.device) + ctx.rank * b  # [b]
    sims = model.similarity(all_img, all_cap)  # [B, B]
    i2t, t2i = sims[local], sims[:, local].T  # [b, B] each
    if train.loss == "hinge":
        hardest = epoch >= train.warmup_epochs
        local_loss = hinge_triplet_loss(i2t, positive, groups, all_groups, train.margin, hardest=hardest) + hinge_triplet_loss(
            t2i, positive, groups, all_groups, train.margin, hardest=hardest
        )
        share = local_loss * ctx.world_size  # a sum over queries: the ranks' parts add up to it
    else:
        # Mean cosine over text blocks, so the temperature means what it means in CLIP.
        scale, blocks = model.scaled_logit_scale(), model.text_blocks
        share = (infonce_loss(i2t / blocks, positive, groups, all_groups, scale) + infonce_loss(t2i / blocks, positive, groups, all_groups, scale)) / 2
    views = model.image_encoder.views
    if views > 1 and train.decorrelation_weight > 0:
        per_view = all_img.view(all_img.size(0), views, -1)  # [B, V, E]
        share = share + train.decorrelation_weight * multi_view_decorrelation(per_view)
    return share


def _gather_ints(x: Tensor, ctx: DistContext) -> Tensor:
    parts = [torch.empty_like(x) for _ in range(ctx.world_size)]
    dist.all_gather(parts, x)
    return torch.cat(parts)
