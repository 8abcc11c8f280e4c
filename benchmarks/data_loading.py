"""Training input pipeline: images/s from JPEG files against the prepared uint8 cache, with 0, 1 and 2 workers.

Builds a small synthetic dataset at `--image-size` in a temporary folder, prepares it
twice (`data.cache_res` equal to the input resolution, and 0: decode each JPEG while
training), then drains the train stage's own loader (shuffled global batches, OpenCV
decode, augmentation and resize, tokenisation) for each source and worker count. Ratios
are against decoding JPEGs in the training process, timed in the same run.

    python benchmarks/data_loading.py                      # 2000 images at 256 px, batch 128
    python benchmarks/data_loading.py --image-size 64      # the embedded default's size
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from avse import pipeline
from avse.config import Config, load_config
from avse.data.dataset import PairDataset, PreparedSplit
from avse.data.prepare import prepare
from avse.data.tokenizer import CaptionTokenizer, load_tokenizer, train_wordpiece
from avse.training.distributed import DistContext
from avse.training.batches import Collate, GlobalBatchSampler

PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"


def images_per_second(split: PreparedSplit, config: Config, tokenize: CaptionTokenizer, batch_size: int, workers: int) -> float:
    """Pairs per second through the train stage's loader, first batch excluded (worker start-up)."""
    ctx = DistContext(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    sampler = GlobalBatchSampler(len(split.captions), batch_size, ctx, seed=0)
    dataset = PairDataset(split, config.data.img_res, config.data.resize, config.data.augment)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=Collate(tokenize),
                        num_workers=workers, drop_last=True)
    batches = iter(loader)
    next(batches)
    start, pairs = time.perf_counter(), 0
    for images, *_ in batches:
        pairs += len(images)
    return pairs / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000, help="training images (5 captions each)")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp())
    os.chdir(root)  # the pipeline's paths are relative to the project
    synthetic = [f"data.synthetic.train_images={args.images}", "data.synthetic.dev_images=50", "data.synthetic.test_images=50",
                 f"data.synthetic.image_size={args.image_size}", f"data.img_res={args.image_size}"]
    pipeline.synthesize(load_config(PARAMS, synthetic))
    splits, configs = {}, {}
    for source, cache_res in (("cache", args.image_size), ("jpeg", 0)):
        config = load_config(PARAMS, synthetic + [f"data.cache_res={cache_res}"])
        prepare(config, root / source, tokenizer_builder=partial(train_wordpiece, vocab_size=config.data.vocab_size), progress=False)
        splits[source], configs[source] = PreparedSplit.load(root / source, "train"), config
    tokenize = CaptionTokenizer(load_tokenizer(root / "cache" / "tokenizer"), max_len=32)

    rates = {(source, workers): images_per_second(split, configs[source], tokenize, args.batch_size, workers)
             for workers in (0, 1, 2) for source, split in splits.items()}
    baseline = rates["jpeg", 0]
    print(f"{args.images * 5} pairs of {args.image_size} px images, batch {args.batch_size}, {os.cpu_count()} CPUs")
    print(f"{'source':8} {'workers':>7} {'pairs/s':>9} {'vs JPEG, 0 workers':>19}")
    for (source, workers), rate in rates.items():
        print(f"{source:8} {workers:7d} {rate:9.0f} {rate / baseline:18.2f}x")


if __name__ == "__main__":
    main()
