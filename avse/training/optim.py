"""Optimiser and learning-rate schedule."""

from __future__ import annotations

import bisect
import math

import torch

from avse.config import TrainConfig
from avse.model.avse import AVSE


def build_optimizer(model: AVSE, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW: backbones at `lr * backbone_lr_mult`, no weight decay on norms and biases."""
    groups = model.parameter_groups()
    backbone_lr = config.lr * config.backbone_lr_mult
    param_groups = [
        {"params": groups["backbone"], "lr": backbone_lr, "weight_decay": config.weight_decay},
        {"params": groups["backbone_no_decay"], "lr": backbone_lr, "weight_decay": 0.0},
        {"params": groups["head"], "lr": config.lr, "weight_decay": config.weight_decay},
        {"params": groups["head_no_decay"], "lr": config.lr, "weight_decay": 0.0},
    ]
    fused = all(p.is_cuda for g in param_groups for p in g["params"])
    return torch.optim.AdamW([g for g in param_groups if g["params"]], fused=fused or None, foreach=None if fused else True)


def lr_factor(step: int, steps_per_epoch: int, total_steps: int, config: TrainConfig) -> float:
    """Linear warmup over `warmup_steps`, then the schedule: `step` multiplies by `lr_decay_rate` at each
    of `lr_decay_epochs`; `cosine` decays from 1 to 0 between the end of the warmup and `total_steps`."""
    warmup = min(1.0, (step + 1) / config.warmup_steps) if config.warmup_steps else 1.0
    if config.lr_schedule == "cosine":
        progress = (step - config.warmup_steps) / max(1, total_steps - config.warmup_steps)
        return warmup * 0.5 * (1 + math.cos(math.pi * min(1.0, max(0.0, progress))))
    epoch = step // max(1, steps_per_epoch)
    return warmup * config.lr_decay_rate ** bisect.bisect_right(sorted(config.lr_decay_epochs), epoch)
