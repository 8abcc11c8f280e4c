"""Torch datasets over a prepared split: caption-image pairs for training, unique images and captions for embedding.

Images come from the prepared uint8 cache when it exists (no JPEG decoding in the
training loop), else from the files. Items are uint8 `[3, H, W]` tensors: scaling and
normalisation happen on the model's device, which keeps host-to-device copies small.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from avse.data.images import load_rgb, resize_square
from avse.errors import DataError


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
            raise DataError(f"{index_path}: no prepared split {split!r} (available: {', '.join(available) or 'none'}; run the prepare stage)")
        index = pd.read_csv(index_path, dtype={"image_id": np.int64, "caption": str}, keep_default_na=False)
        caption_image, image_ids = pd.factorize(index["image_id"])
        first = index.drop_duplicates("image_id")
        cache = prepared / f"{split}_images.npy"
        return cls(
            name=split,
            captions=index["caption"].tolist(),
            caption_image=caption_image.astype(np.int64),
            image_ids=np.asarray(image_ids, dtype=np.int64),
            image_paths=first["image_path"].tolist(),
            cache=cache if cache.exists() else None,
        )


class ImageSource:
    """Images of a split by position, at a fixed square resolution, from the cache or the files."""

    def __init__(self, split: PreparedSplit, resolution: int):
        self.split, self.resolution = split, resolution
        self._cache: np.ndarray | None = None  # opened lazily: each loader worker maps it itself

    def __len__(self) -> int:
        return len(self.split.image_ids)

    def __getitem__(self, position: int) -> np.ndarray:
        """`[resolution, resolution, 3]` uint8 RGB."""
        if self.split.cache is not None:
            if self._cache is None:
                self._cache = np.load(self.split.cache, mmap_mode="r")
            image = np.asarray(self._cache[position])
        else:
            image = load_rgb(self.split.image_paths[position])
        if image.shape[0] != self.resolution or image.shape[1] != self.resolution:
            image = resize_square(image, self.resolution)
        return image


def to_tensor(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))


class PairDataset(Dataset):
    """One item per caption: (image uint8 [3, R, R], caption text, image position)."""

    def __init__(self, split: PreparedSplit, resolution: int):
        self.split, self.images = split, ImageSource(split, resolution)

    def __len__(self) -> int:
        return len(self.split.captions)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str, int]:
        position = int(self.split.caption_image[index])
        return to_tensor(self.images[position]), self.split.captions[index], position


class ImageDataset(Dataset):
    """Each unique image of a split once: (image uint8 [3, R, R], position)."""

    def __init__(self, split: PreparedSplit, resolution: int):
        self.images = ImageSource(split, resolution)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, position: int) -> tuple[torch.Tensor, int]:
        return to_tensor(self.images[position]), position
