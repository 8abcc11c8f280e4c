"""What the train stage checks from the parameters alone, before it reads data or starts processes."""

from __future__ import annotations

import torch

from avse.config import Config
from avse.model.avse import build_model, random_backbones
from avse.training.distributed import check_devices


def check_training_setup(config: Config) -> None:
    """Raise ConfigError for a setup that cannot train: more processes than GPUs, or a model that does not build
    (a Swin window that does not fit the resolution, captions longer than the text backbone's positions, ...)."""
    check_devices(config.train.nproc_per_node)
    # Random weights on the meta device: every check of the model's construction runs, nothing is
    # allocated and no pretrained weights are loaded.
    with torch.device("meta"):
        build_model(random_backbones(config), config.data.vocab_size)
