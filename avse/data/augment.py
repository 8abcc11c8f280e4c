"""Training-time augmentation, as the official AVSE code: a random crop, a horizontal flip, and captions that follow the flip.

Each training item's draws come from its own seed (`GlobalBatchSampler` derives it from
`train.seed`, the epoch and the caption index), so an item is augmented alike whichever
process or loader worker loads it, and after a resume. Embedding and evaluation never augment.

The crop is taken from the whole image the dataset holds (`ImageSource.whole`): with a
prepared cache (`data.cache_res` > 0) that is the image already resampled to
`cache_res` x `cache_res` (stretched or centre-cropped per `data.resize`), so the crop
is resampled twice (original -> cache -> input) and, at `cache_res` = `data.img_res`, a crop
of r x the side is upscaled by 1 / r from fewer pixels than the original holds. The
official code crops the original pixels and resamples once; `data.cache_res: 0` (decode
the JPEGs while training) does exactly that. A cache larger than `img_res` narrows the gap.
Pixels stay uint8 (the official code resizes float32), a rounding difference of at most 0.5.
"""

from __future__ import annotations

import re

import numpy as np

from avse.config import AugmentConfig
from avse.data.images import Resize, resize_square

MIN_CROP_RATIO = 0.6  # the crop keeps r ~ U(0.6, 1) of each side
FLIP_ABOVE = 0.5  # flip when the flip uniform exceeds this: probability 0.5

# A left/right word: the root and an optional suffix, as a whole word ("bright", "upright",
# "leftover", "lefty", "rights", "copyright" do not match). Hyphenated compounds swap through
# their left/right part: "left-handed" <-> "right-handed", "top-left" <-> "top-right".
SIDE_WORD = re.compile(r"\b(left|right)(most|hand|handed|ward|wards)?\b", re.IGNORECASE)


def item_uniforms(item_seed: int) -> np.ndarray:
    """`[4]` uniforms in [0, 1) of one training item: crop ratio, crop top, crop left, flip.

    All four are drawn whether or not crop and flip are on, so turning one off leaves the other's draws as they were.
    """
    return np.random.default_rng(item_seed).random(4)


def crop_box(height: int, width: int, u_ratio: float, u_top: float, u_left: float) -> tuple[int, int, int, int]:
    """`(top, left, crop_height, crop_width)` of the official random crop of a `height` x `width` image.

    One ratio r = 0.6 + 0.4 u_ratio for both sides: `int(r height) x int(r width)`. The corner is uniform
    over `0 .. height - crop_height - 1` (`np.random.randint(height - crop_height)`, whose bound is
    exclusive, as in the official code), 0 when the crop is as tall as the image; likewise across.
    """
    ratio = MIN_CROP_RATIO + (1 - MIN_CROP_RATIO) * u_ratio
    crop_h, crop_w = int(height * ratio), int(width * ratio)
    return int(u_top * (height - crop_h)), int(u_left * (width - crop_w)), crop_h, crop_w


def swap_left_right(caption: str) -> str:
    """`caption` with "left" and "right" exchanged as whole words, as a horizontally flipped image needs.

    Words: left/right with the suffixes -most, -hand, -handed, -ward, -wards (and hyphenated compounds
    through their root). The root's case is kept when it is lower, Capitalised or UPPER, so swapping twice
    gives the caption back. Words are not parsed: "right" as in "right in front" is swapped too.
    """
    def swap(match: re.Match[str]) -> str:
        root = match.group(1)
        other = "right" if root.lower() == "left" else "left"
        if root.isupper():
            other = other.upper()
        elif root[0].isupper():
            other = other.capitalize()
        return other + (match.group(2) or "")

    return SIDE_WORD.sub(swap, caption)


def augment_pair(
    whole: np.ndarray, caption: str, resolution: int, resize: Resize, config: AugmentConfig, item_seed: int
) -> tuple[np.ndarray, str]:
    """One training pair as the official code augments it: `whole` `[h, w, 3]` uint8 -> `[resolution, resolution, 3]`
    uint8, and its caption.

    Crop (`config.crop`): the `crop_box` region; then the region, or the whole image, becomes the input square
    (`resize_square`); then the flip (`config.flip`, p = 0.5), whose caption gets its left/right words swapped
    under `config.flip_captions: swap` ("left of" is false in a mirrored image) or is kept (`keep`, the official code).
    """
    u_ratio, u_top, u_left, u_flip = item_uniforms(item_seed)
    if config.crop:
        top, left, crop_h, crop_w = crop_box(whole.shape[0], whole.shape[1], u_ratio, u_top, u_left)
        whole = whole[top : top + crop_h, left : left + crop_w]
    image = resize_square(whole, resolution, resize)
    if config.flip and u_flip > FLIP_ABOVE:
        image = image[:, ::-1]
        if config.flip_captions == "swap":
            caption = swap_left_right(caption)
    return image, caption
