import struct
import zlib

import cv2
import numpy as np
import pytest

from avse.data.images import MAX_PIXELS, load_rgb, resize_square
from avse.errors import DataError


def jpeg_bytes(image: np.ndarray) -> bytes:
    return cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 100])[1].tobytes()


def test_colour_jpeg_is_rgb(tmp_path):
    bgr = np.zeros((8, 8, 3), np.uint8)
    bgr[..., 2] = 255  # red in opencv's BGR order
    (tmp_path / "red.jpg").write_bytes(jpeg_bytes(bgr))
    image = load_rgb(tmp_path / "red.jpg")
    assert image.shape == (8, 8, 3) and image.dtype == np.uint8
    assert image[..., 0].min() > 240 and image[..., 2].max() < 15


def test_png_named_jpg_and_grayscale_load_as_rgb(tmp_path):
    gray = np.arange(64, dtype=np.uint8).reshape(8, 8)
    (tmp_path / "gray.jpg").write_bytes(cv2.imencode(".png", gray)[1].tobytes())
    image = load_rgb(tmp_path / "gray.jpg")
    assert image.shape == (8, 8, 3)
    np.testing.assert_array_equal(image[..., 0], gray)
    np.testing.assert_array_equal(image[..., 1], gray)


def test_cmyk_jpeg_loads_as_rgb(tmp_path):
    from PIL import Image

    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", quality=100)  # pure red in CMYK
    image = load_rgb(tmp_path / "cmyk.jpg")
    assert image.shape == (8, 8, 3)
    assert image[..., 0].mean() > 200 and image[..., 1].mean() < 60


def test_truncated_jpeg_is_refused(tmp_path):
    data = jpeg_bytes(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"cut.jpg: truncated JPEG"):
        load_rgb(tmp_path / "cut.jpg")


def png_claiming(side: int) -> bytes:
    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + header
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(header)) + chunk + struct.pack(">I", zlib.crc32(chunk))


def jpeg_claiming(side: int) -> bytes:
    """A real 8x8 JPEG whose frame header says it is side x side."""
    data = bytearray(jpeg_bytes(np.zeros((8, 8, 3), np.uint8)))
    frame = data.index(b"\xff\xc0")  # baseline start of frame: marker, length, precision, height, width
    data[frame + 5 : frame + 9] = struct.pack(">HH", side, side)
    return bytes(data)


@pytest.mark.parametrize("encode", [png_claiming, jpeg_claiming])
def test_decompression_bomb_is_refused_before_decoding(tmp_path, encode):
    side = int(MAX_PIXELS ** 0.5) + 1
    (tmp_path / "bomb.img").write_bytes(encode(side))
    with pytest.raises(DataError, match=rf"bomb.img: image is {side}x{side} pixels, over the limit"):
        load_rgb(tmp_path / "bomb.img")


@pytest.mark.parametrize("content, message", [(None, "image file not found"), (b"", "image file is empty"),
                                              (b"GIF89a nonsense", "not a decodable image")])
def test_unreadable_files_name_the_file(tmp_path, content, message):
    path = tmp_path / "x.jpg"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(DataError, match=f"x.jpg: {message}"):
        load_rgb(path)


def test_resize_square_crop_mode_centre_crops_the_longer_side():
    image = np.zeros((20, 40, 3), np.uint8)
    image[:, 10:30] = 255  # the centre square of a wide image
    out = resize_square(image, 10, "crop")
    assert out.shape == (10, 10, 3)
    assert out.min() == 255


def grey(rows: list[list[int]]) -> np.ndarray:
    """`[H, W, 3]` uint8 with every channel `rows`."""
    return np.repeat(np.array(rows, dtype=np.uint8)[..., None], 3, axis=2)


@pytest.mark.parametrize("tall", [False, True])
def test_stretch_keeps_the_whole_image_and_crop_only_its_centre(tall):
    image = grey([[0, 100, 200, 40], [10, 110, 210, 50]])  # 2 x 4, every pixel its own value
    image = image.transpose(1, 0, 2) if tall else image

    def pixels(out: np.ndarray) -> list[list[int]]:
        assert out.shape == (2, 2, 3) and (out == out[..., :1]).all()
        return (out.transpose(1, 0, 2) if tall else out)[..., 0].tolist()

    # Bilinear at half the width: each output column is the mean of two input columns; all four columns count.
    assert pixels(resize_square(image, 2, "stretch")) == [[50, 120], [60, 130]]
    # The shorter side is already 2: the middle two columns as they are, the outer two lost.
    assert pixels(resize_square(image, 2, "crop")) == [[100, 200], [110, 210]]


def test_stretch_scales_each_side_on_its_own():
    image = grey([[0, 40, 80, 120, 160, 200]])  # 1 x 6
    out = resize_square(image, 3, "stretch")
    assert out[..., 0].tolist() == [[20, 100, 180]] * 3  # rows repeated, column pairs averaged
    same = grey([[1, 2], [3, 4]])
    assert resize_square(same, 2, "stretch") is same  # already the size: untouched
