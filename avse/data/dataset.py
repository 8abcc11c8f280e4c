"""Torch datasets over a prepared split: caption-image pairs for training, unique images and captions for embedding.

Images come from the prepared uint8 cache when it exists (no JPEG decoding in the
training loop), else from the files. Items are uint8 `[3, H, W]` tensors: scaling and
normalisation happen on the model's device, which keeps host-to-device copies small.
Training pairs are augmented (avse/data/augment.py); embedded images never are.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from avse.config import AugmentConfig
from avse.data.augment import augment_pair
from avse.data.images import Resize, load_rgb, resize_square
from avse.errors import ConfigError, DataError


@dataclass(frozen=True)
class PreparedSplit:
    """The index of one prepared split: captions in order, their images, and the cache."""

    name: str
    captions: list[str]  # [n_captions]
    caption_image: np.ndarray  # [n_captions] position of each caption's image in `image_ids`
    image_ids: np.ndarray  # [n_images] original image ids, first-seen order
    image_paths: list[str]  # [n_images]
    cache: Path | None

    @classmethod
    def load(cls, prepared: Path, split: str) -> "PreparedSplit":
        index_path = prepared / f"{split}.csv"
        if not index_path.exists():
            available = sorted(p.stem for p in prepared.glob("*.csv") if p.stem != "dropped")
            hint = "; data.dev_images carves one from train" if split == "dev" else ""
            raise DataError(f"{index_path}: no prepared split {split!r} (available: {', '.join(available) or 'none'}; run the prepare stage{hint})")
        index = pd.read_csv(index_path, dtype={"image_id": np.int64, "caption": str}, keep_default_na=False)
        caption_image, image_ids = pd.factorize(index["image_id"])
        first = index.drop_duplicates("image_id")
        cache = cache_path(prepared, split)
        return cls(
            name=split,
            captions=index["caption"].tolist(),
            caption_image=caption_image.astype(np.int64),
            image_ids=np.asarray(image_ids, dtype=np.int64),
            image_paths=first["image_path"].tolist(),
            cache=cache if cache.exists() else None,
        )


def cache_path(prepared: Path, split: str) -> Path:
    """Where the prepared uint8 image cache of `split` is (absent when prepared with `data.cache_res: 0`)."""
    return prepared / f"{split}_images.npy"


def check_image_cache(prepared: Path, splits: Sequence[str], cache_res: int, img_res: int) -> None:
    """Refuse, before any work, image caches that cannot give `img_res` inputs as `data.cache_res` asks.

    A cache smaller than the input would upscale every image (and crop from even fewer pixels); a cache
    of another side than `cache_res` (or one present at `cache_res: 0`, or absent at a non-zero one) is
    left from a prepare under other parameters. Splits that are not prepared are left to `PreparedSplit.load`.
    """
    if cache_res and cache_res < img_res:
        raise ConfigError(f"data.cache_res: {cache_res} is smaller than data.img_res: {img_res}; "
                          f"prepare with -S data.cache_res={img_res} (or 0 to decode the JPEGs)")
    for split in splits:
        if not (prepared / f"{split}.csv").exists():
            continue
        path = cache_path(prepared, split)
        side = np.load(path, mmap_mode="r").shape[1] if path.exists() else 0
        if side != cache_res:
            held = f"holds {side} px images" if side else "does not exist"
            raise DataError(f"{path}: {held}, but data.cache_res is {cache_res}; prepare again with data.cache_res: {cache_res}")


class ImageSource:
    """Images of a split by position, from the cache or the files: whole (to crop from), or as `resolution` squares."""

    def __init__(self, split: PreparedSplit, resolution: int, resize: Resize):
        self.split, self.resolution, self.resize = split, resolution, resize
        self._cache: np.ndarray | None = None  # opened lazily: each loader worker maps it itself

    def __len__(self) -> int:
        return len(self.split.image_ids)

    def whole(self, position: int) -> np.ndarray:
        """The whole image that training crops from, `[h, w, 3]` uint8 RGB: the cache's square (made per `data.resize`
        at prepare), else the decoded file: as it is for `stretch` (a crop of it is a crop of the original pixels, as in
        the official code), its centre square at its own scale for `crop`."""
        if self.split.cache is not None:
            if self._cache is None:
                self._cache = np.load(self.split.cache, mmap_mode="r")
            return np.asarray(self._cache[position])
        image = load_rgb(self.split.image_paths[position])
        return image if self.resize == "stretch" else resize_square(image, min(image.shape[:2]), "crop")

    def __getitem__(self, position: int) -> np.ndarray:
        """`[resolution, resolution, 3]` uint8 RGB, the whole image (no augmentation)."""
        return resize_square(self.whole(position), self.resolution, self.resize)


def to_tensor(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))


class PairDataset(Dataset):
    """One item per caption, keyed by `(caption index, item seed)`: (image uint8 [3, R, R], caption text, image position,
    item seed).

    The key's seed (`GlobalBatchSampler` derives it from the run's seed, the epoch and the index) decides the item's
    augmentation, so a loader worker needs no epoch of its own; the item carries it on for caption augmentation.
    """

    def __init__(self, split: PreparedSplit, resolution: int, resize: Resize, augment: AugmentConfig):
        self.split, self.images = split, ImageSource(split, resolution, resize)
        self.augment = augment

    def __len__(self) -> int:
        return len(self.split.captions)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, str, int, int]:
        index, item_seed = key
        position = int(self.split.caption_image[index])
        image, caption = augment_pair(self.images.whole(position), self.split.captions[index], self.images.resolution,
                                      self.images.resize, self.augment, item_seed)
        return to_tensor(image), caption, position, item_seed


class ImageDataset(Dataset):
    """Each unique image of a split once, never augmented: (image uint8 [3, R, R], position)."""

    def __init__(self, split: PreparedSplit, resolution: int, resize: Resize):
        self.images = ImageSource(split, resolution, resize)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, position: int) -> tuple[torch.Tensor, int]:
        return to_tensor(self.images[position]), position
