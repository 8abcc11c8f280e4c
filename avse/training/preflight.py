"""What the train stage checks from the parameters alone, before it reads data or starts processes."""

from __future__ import annotations

import dataclasses

import torch

from avse.config import Config
from avse.model.avse import build_model
from avse.training.distributed import check_devices


def check_training_setup(config: Config) -> None:
    """Raise ConfigError for a setup that cannot train: more processes than GPUs, or a model that does not build
    (a Swin window that does not fit the resolution, captions longer than the text backbone's positions, ...)."""
    check_devices(config.train.nproc_per_node)
    # Random weights on the meta device: every check of the model's construction runs, nothing is
    # allocated and no pretrained weights are loaded.
    model = config.model
    architecture = dataclasses.replace(model, vision=dataclasses.replace(model.vision, init="random"),
                                       text=dataclasses.replace(model.text, init="random"))
    with torch.device("meta"):
        build_model(dataclasses.replace(config, model=architecture), config.data.vocab_size)
