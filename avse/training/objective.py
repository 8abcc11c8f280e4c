"""The training objective of a global batch, split over ranks."""

from __future__ import annotations

import torch
from torch import Tensor

from avse.config import Config
from avse.model.avse import AVSE
from avse.model.losses import hinge_triplet_loss, infonce_loss, multi_view_decorrelation, official_decorrelation
from avse.training.distributed import DistContext, gather_batch


def contrastive_loss(model: AVSE, img: Tensor, cap: Tensor, groups: Tensor, ctx: DistContext, config: Config, epoch: int) -> Tensor:
    """The objective of the whole global batch, the same value on every rank.

    img `[b, V * E]`, cap `[b, E]`, groups `[b]` (image ids) are the local batch. The
    similarity is computed on the gathered global batch `[B, B]`; after DDP's average, the
    gradients are those of one process on the whole batch (see `gather_batch`).
    """
    train = config.train
    all_img = gather_batch(img.float(), ctx)  # [B, V * E]
    all_cap = gather_batch(cap.float(), ctx)  # [B, E]
    all_groups = gather_batch(groups, ctx)  # [B]
    positive = torch.arange(all_img.size(0), device=img.device)  # [B]
    sims = model.similarity(all_img, all_cap)  # [B, B] images x captions
    if train.loss == "hinge":
        hardest = epoch >= train.warmup_epochs
        loss = sum(hinge_triplet_loss(s, positive, all_groups, all_groups, train.margin, hardest=hardest) for s in (sims, sims.T))
    else:
        # Mean cosine over text blocks, so the temperature means what it means in CLIP.
        scale, blocks = model.scaled_logit_scale(), model.text_blocks
        loss = sum(infonce_loss(s / blocks, positive, all_groups, all_groups, scale) for s in (sims, sims.T)) / 2
    views = model.image_encoder.views
    if views > 1 and train.decorrelation_weight > 0:
        per_view = all_img.view(all_img.size(0), views, -1)  # [B, V, E]
        decorrelation = official_decorrelation if train.decorrelation == "official" else multi_view_decorrelation
        loss = loss + train.decorrelation_weight * decorrelation(per_view)
    return loss
