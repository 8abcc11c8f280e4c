"""What each training step is fed: global batches that do not depend on the process count, and their collation."""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Sampler

from avse.data.tokenizer import CaptionTokenizer
from avse.training.distributed import DistContext
from avse.training.seeding import Draw, derive_seed


class GlobalBatchSampler(Sampler[tuple[int, int]]):
    """A per-epoch shuffle cut into global batches of `world * batch_size`; each rank takes its contiguous slice.

    The same seed and epoch give the same global batches for any number of processes,
    and an epoch can start at any batch (resuming mid-epoch). The last partial global
    batch is dropped, so every step has a full batch of negatives.

    Yields `(caption index, item seed)` keys for `PairDataset`; the item seed, derived from
    (seed, Draw.AUGMENT, epoch, index), decides the item's augmentation. The sampler runs in
    the main process, so the epoch reaches persistent loader workers through the keys.
    """

    def __init__(self, size: int, batch_size: int, ctx: DistContext, seed: int, accumulation: int = 1):
        self.size, self.batch_size, self.ctx, self.seed = size, batch_size, ctx, seed
        self.global_batch = batch_size * ctx.world_size
        # Whole accumulation windows only, so that an epoch ends on an optimiser step.
        self.batches_per_epoch = size // self.global_batch // accumulation * accumulation
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.start_batch) * self.batch_size

    def __iter__(self) -> Iterator[tuple[int, int]]:
        shuffle = torch.Generator().manual_seed(derive_seed(self.seed, Draw.SHUFFLE, self.epoch))
        order = torch.randperm(self.size, generator=shuffle).tolist()
        offset = self.ctx.rank * self.batch_size
        for batch in range(self.start_batch, self.batches_per_epoch):
            start = batch * self.global_batch + offset
            for index in order[start : start + self.batch_size]:
                yield index, derive_seed(self.seed, Draw.AUGMENT, self.epoch, index)


class Collate:
    """Stack images, tokenize (and augment) captions, keep image positions as the caption groups."""

    def __init__(self, tokenize: CaptionTokenizer):
        self.tokenize = tokenize

    def __call__(self, items: list[tuple[Tensor, str, int, int]]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        images, captions, positions, item_seeds = zip(*items)
        # A stream of its own per item: the caption's draws do not follow from its image's crop and flip.
        generators = [np.random.default_rng(derive_seed(seed, Draw.CAPTION)) for seed in item_seeds] if self.tokenize.augment else None
        input_ids, attention_mask = self.tokenize(list(captions), generators)
        return torch.stack(images), input_ids, attention_mask, torch.tensor(positions)
