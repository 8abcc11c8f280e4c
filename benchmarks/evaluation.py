"""Whole-evaluation cost on the default configuration: each image encoded once vs once per caption.

The reference evaluation encodes every image once per caption (5 times); the embed
stage encodes each unique image once. Both are timed here on the same model (randomly
initialised: the cost does not depend on the weights) and the same images, then the
exact scoring and the recall metrics of the 1000 x 5000 test matrix.

    python benchmarks/evaluation.py                  # default params.yaml, 1000 test images
    python benchmarks/evaluation.py --images 200     # quicker
"""

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from avse.config import load_config
from avse.data.dataset import PreparedSplit
from avse.evaluation.embed import encode_images
from avse.evaluation.recall import recall_metrics
from avse.model.avse import build_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=256)
    args = parser.parse_args()

    config = load_config()
    res, n = config.data.img_res, args.images
    model = build_model(config, vocab_size=config.data.vocab_size).eval()
    pixels = np.random.default_rng(0).integers(0, 256, (n, res, res, 3), dtype=np.uint8)
    folder = Path(tempfile.mkdtemp())
    np.save(folder / "once.npy", pixels)
    np.save(folder / "per_caption.npy", np.repeat(pixels, 5, axis=0))  # what per-caption encoding reads
    once = PreparedSplit("test", [""] * 5 * n, np.repeat(np.arange(n), 5), np.arange(n), [""] * n, folder / "once.npy")
    per_caption = PreparedSplit("test", [""] * 5 * n, np.arange(5 * n), np.arange(5 * n), [""] * 5 * n, folder / "per_caption.npy")

    def timed(split: PreparedSplit) -> float:
        start = time.perf_counter()
        encode_images(model, split, res, args.batch_size, torch.device("cpu"), resize=config.data.resize)
        return time.perf_counter() - start

    timed(once)  # warm-up: allocator, kernels, page cache
    unique_s, per_caption_s = timed(once), timed(per_caption)
    shutil.rmtree(folder)
    img = torch.randn(n, config.model.views * config.model.embed_size)
    cap = torch.randn(5 * n, config.model.embed_size)
    start = time.perf_counter()
    sims = model.similarity(img, cap, chunk_size=config.eval.chunk_size)
    score_s = time.perf_counter() - start
    start = time.perf_counter()
    recall_metrics(sims)
    recall_s = time.perf_counter() - start

    print(f"{n} images, {5 * n} captions, {config.model.vision.name} at {res}px, {torch.get_num_threads()} threads")
    print(f"{'encode each image once':<34}{unique_s:8.2f} s {n / unique_s:8.1f} images/s")
    print(f"{'encode once per caption (5x)':<34}{per_caption_s:8.2f} s {5 * n / per_caption_s:8.1f} images/s")
    print(f"{'ratio':<34}{per_caption_s / unique_s:8.2f} x faster")
    print(f"{'exact scoring':<34}{score_s:8.3f} s")
    print(f"{'recall metrics':<34}{recall_s:8.3f} s")


if __name__ == "__main__":
    main()
