"""The pipeline's stages as functions of the validated config: what `stages/*.py` and the `avse` command run."""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path

from avse.config import Config

log = logging.getLogger("avse")

SYNTHETIC_CAPTIONS = Path("data/synthetic")
SYNTHETIC_IMAGES = Path("data/synthetic-images")


def synthesize(config: Config) -> None:
    """Generate the embedded synthetic dataset in the caption-split layout."""
    from avse.data.synthetic import generate_dataset

    spec = config.data.synthetic
    generate_dataset(
        SYNTHETIC_CAPTIONS,
        SYNTHETIC_IMAGES,
        seed=spec.seed,
        image_size=spec.image_size,
        split_sizes={"train": spec.train_images, "dev": spec.dev_images, "test": spec.test_images},
        min_objects=spec.min_objects,
        max_objects=spec.max_objects,
    )
    log.info("synthetic dataset written to %s and %s", SYNTHETIC_CAPTIONS, SYNTHETIC_IMAGES)


def prepare(config: Config) -> None:
    """Validate the raw dataset and write `data/prepared/<dataset>/`."""
    from avse.data.prepare import prepare as prepare_dataset, prepared_dir
    from avse.data.tokenizer import train_wordpiece

    builder = None
    if config.model.text.init == "random":
        builder = partial(train_wordpiece, vocab_size=config.data.vocab_size)
    out = prepared_dir(config)
    stats = prepare_dataset(config, out, tokenizer_builder=builder)
    for split, s in stats.items():
        if isinstance(s, dict):
            log.info("%-8s %6d images %7d captions, %.1f words per caption", split, s["images"], s["captions"], s["words_per_caption"]["mean"])
    log.info("prepared dataset written to %s", out)
