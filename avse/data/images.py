"""Image loading with opencv: always RGB uint8, with clear errors for files that are not images."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import cv2
import numpy as np

from avse.errors import DataError

# Refuse images larger than this before decoding them (a decompression-bomb guard):
# 16k x 16k is far beyond any dataset photo.
MAX_PIXELS = 16384 * 16384

Resize = Literal["stretch", "crop"]  # data.resize: how a whole image becomes a square


def load_rgb(path: str | Path) -> np.ndarray:
    """Decode an image file into `[H, W, 3]` uint8 RGB (grayscale and CMYK converted).

    The content decides the decoder, not the extension, so a PNG named `.jpg` loads.
    A truncated JPEG is refused rather than silently padded with grey.
    """
    path = Path(path)
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except FileNotFoundError:
        raise DataError(f"{path}: image file not found") from None
    except OSError as err:
        raise DataError(f"{path}: cannot read image file ({err.strerror})") from None
    return decode_rgb(data, str(path))


def decode_rgb(data: np.ndarray, name: str) -> np.ndarray:
    """The encoded image bytes `data` (uint8 `[n]`) as `[H, W, 3]` uint8 RGB; `name` says where they came from in errors."""
    if data.size == 0:
        raise DataError(f"{name}: image file is empty")
    if data[:3].tobytes() == b"\xff\xd8\xff" and not _has_jpeg_end(data):
        raise DataError(f"{name}: truncated JPEG (no end-of-image marker)")
    header = _header_size(data)
    if header is not None and header[0] * header[1] > MAX_PIXELS:
        raise DataError(f"{name}: image is {header[1]}x{header[0]} pixels, over the limit of {MAX_PIXELS} pixels")
    image = cv2.imdecode(data, cv2.IMREAD_COLOR)
    if image is None:
        raise DataError(f"{name}: not a decodable image")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def _has_jpeg_end(data: np.ndarray) -> bool:
    # Some encoders pad after the end-of-image marker, so look near the end, not only at it.
    tail = data[-1024:].tobytes()
    return b"\xff\xd9" in tail


def _header_size(data: np.ndarray) -> tuple[int, int] | None:
    """(height, width) read from a PNG or JPEG header without decoding pixels, else None."""
    raw = data[: 1 << 16].tobytes()
    if raw.startswith(b"\x89PNG\r\n\x1a\n") and len(raw) >= 24:
        return int.from_bytes(raw[20:24], "big"), int.from_bytes(raw[16:20], "big")
    if raw.startswith(b"\xff\xd8"):
        i = 2
        while i + 9 < len(raw):
            if raw[i] != 0xFF:
                return None
            marker = raw[i + 1]
            length = int.from_bytes(raw[i + 2 : i + 4], "big")
            if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # start of frame
                return int.from_bytes(raw[i + 5 : i + 7], "big"), int.from_bytes(raw[i + 7 : i + 9], "big")
            i += 2 + length
    return None


def resize_square(image: np.ndarray, size: int, mode: Resize) -> np.ndarray:
    """The whole image `[H, W, 3]` as `[size, size, 3]` uint8, as `data.resize` (`mode`) says.

    `stretch` scales each side to `size` (bilinear, aspect changed, nothing lost), as the official
    code and VSE-infinity do. `crop` scales the shorter side to `size` (area-averaged when
    shrinking) and centre-crops the longer one (aspect kept, its ends lost).
    """
    height, width = image.shape[:2]
    if mode == "stretch":
        if (height, width) == (size, size):
            return image
        return cv2.resize(image, (size, size), interpolation=cv2.INTER_LINEAR)
    scale = size / min(height, width)
    new_h, new_w = max(size, round(height * scale)), max(size, round(width * scale))
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    resized = cv2.resize(image, (new_w, new_h), interpolation=interpolation)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return np.ascontiguousarray(resized[top : top + size, left : left + size])
