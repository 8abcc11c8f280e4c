"""Procedurally generated image-caption dataset: the default data, needing no download.

Each image shows four or more coloured shapes on a dark background; each of its five
captions names a different subset of two or three of them, by size, colour and shape,
with the spatial relation of a related pair. No caption covers the whole image, so
retrieval needs fine-grained alignment, and a caption is specific enough to be true of
about one test image in a thousand (`benchmarks/synthetic_ceiling.py`). Output uses the
Flickr30K caption-split layout, so the real-data code path reads it.

Relation rule: object A is "left of" / "right of" B only when the horizontal centre
separation is at least `RELATION_AXIS_RATIO` times the vertical one AND their horizontal
extents do not overlap (A lies wholly to one side of B); "above" / "below" likewise
with the axes swapped. Pairs on a diagonal get no relation, so every stated relation
is the only one a reader could choose. Every shape is mirror-symmetric, so a horizontally
flipped image (training augmentation) is the scene mirrored, whose captions are the
originals with "left of" and "right of" exchanged (`data.augment.flip_captions: swap`).
"""

from __future__ import annotations

import itertools
import json
import math
import re
import zlib
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from avse.progress import progress as progress_bar

from avse.errors import ConfigError
from avse.io import atomic_path

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross", "diamond")

# Far apart in RGB so each survives JPEG chroma subsampling at 64 px.
# Every word (colours, shapes, sizes) starts with a consonant, so "a" is always the article.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 30),
    "green": (40, 200, 40),
    "blue": (50, 90, 255),
    "yellow": (250, 230, 30),
    "purple": (190, 50, 240),
    "white": (245, 245, 245),
}

# Full extent (width = height) of an object as a fraction of the image side: 9 and 18 px at 64 px.
SIZES: dict[str, float] = {"small": 0.14, "large": 0.28}

RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")

LIST_TEMPLATES: tuple[str, ...] = ("{objects}", "there is {objects}", "an image with {objects}")
RELATION_TEMPLATES: tuple[str, ...] = (
    "a {a} {rel} a {b}",
    "a {a} is {rel} a {b}",
    "there is a {a} {rel} a {b}",
)

CAPTIONS_PER_IMAGE = 5
MIN_OBJECTS = 4  # with at most three objects per caption, four objects keep every caption partial
MAX_OBJECTS = 6  # more large objects rarely fit without overlap
MIN_IMAGE_SIZE = 32

BACKGROUND_RGB: tuple[int, int, int] = (20, 20, 28)
BACKGROUND_NOISE = 6  # max absolute deviation of the grey noise: mild texture, far below colour gaps

RELATION_AXIS_RATIO = 2.0
# Relational captions per image, one of these at random; fewer when the scene lacks related pairs.
RELATIONAL_CAPTION_TARGETS: tuple[int, ...] = (2, 3)

# Gaps between objects' bounding circles (a fraction of the image side: 3 px at 64 px) and to
# the image edge (in pixels), so anti-aliased edges neither touch nor get clipped.
OBJECT_GAP = 3.0 / 64
EDGE_MARGIN = 1.0
PLACEMENT_ATTEMPTS = 64

SUBPIXEL_BITS = 4  # OpenCV drawing precision: coordinates in 1/16 px
_SUBPIXEL = 1 << SUBPIXEL_BITS


@dataclass(frozen=True)
class SceneObject:
    """One drawn object; `x`, `y` is its centre and `radius` half its extent, in pixels."""

    shape: str
    colour: str
    size: str
    x: float
    y: float
    radius: float


class SceneTooSimpleError(ValueError):
    """The scene cannot yield the requested number of captions about distinct object subsets."""


def _check_object_counts(min_objects: int, max_objects: int) -> None:
    if not isinstance(min_objects, int) or min_objects < MIN_OBJECTS:
        raise ConfigError(
            f"min_objects must be an integer >= {MIN_OBJECTS} so that no caption "
            f"describes a whole image, got {min_objects!r}"
        )
    if not isinstance(max_objects, int) or not min_objects <= max_objects <= MAX_OBJECTS:
        raise ConfigError(
            f"max_objects must be an integer from min_objects ({min_objects}) to {MAX_OBJECTS}, "
            f"got {max_objects!r}"
        )


def _check_image_size(image_size: int) -> None:
    if not isinstance(image_size, int) or image_size < MIN_IMAGE_SIZE:
        raise ConfigError(f"image_size must be an integer >= {MIN_IMAGE_SIZE}, got {image_size!r}")


def sample_scene(
    rng: np.random.Generator, image_size: int, min_objects: int, max_objects: int
) -> list[SceneObject]:
    """Sample non-overlapping objects, fully inside the image, with distinct (colour, shape) pairs.

    Distinct pairs make every caption's "colour shape" phrase name exactly one object.
    """
    _check_object_counts(min_objects, max_objects)
    _check_image_size(image_size)
    kinds = [(colour, shape) for colour in COLOURS for shape in SHAPES]
    size_names = list(SIZES)
    while True:  # restart when a late object finds no free spot
        n_objects = int(rng.integers(min_objects, max_objects + 1))
        chosen_kinds = rng.permutation(len(kinds))[:n_objects]
        sizes = rng.integers(len(size_names), size=n_objects)
        objects: list[SceneObject] = []
        for kind_index, size_index in zip(chosen_kinds, sizes):
            colour, shape = kinds[kind_index]
            size = size_names[size_index]
            radius = SIZES[size] * image_size / 2
            spot = _free_spot(rng, radius, objects, image_size)
            if spot is None:
                break
            objects.append(SceneObject(shape, colour, size, spot[0], spot[1], radius))
        else:
            return objects


def _free_spot(
    rng: np.random.Generator, radius: float, objects: list[SceneObject], image_size: int
) -> tuple[float, float] | None:
    """A random centre that keeps clear of `objects` and the image edge, or None after many tries."""
    low, high = radius + EDGE_MARGIN, image_size - 1 - radius - EDGE_MARGIN
    clearance = _bounding_radius(radius) + OBJECT_GAP * image_size
    for _ in range(PLACEMENT_ATTEMPTS):
        x = _snap(low + (high - low) * rng.random())
        y = _snap(low + (high - low) * rng.random())
        if all(math.hypot(x - o.x, y - o.y) >= clearance + _bounding_radius(o.radius) for o in objects):
            return x, y
    return None


def _snap(coordinate: float) -> float:
    """Round to the drawing grid, so stored centres are exactly the drawn ones."""
    return round(coordinate * _SUBPIXEL) / _SUBPIXEL


def _bounding_radius(radius: float) -> float:
    """Radius of a circle containing any shape of half-extent `radius` (a square's corners)."""
    return radius * math.sqrt(2.0)


def render_scene(
    objects: list[SceneObject], image_size: int, rng: np.random.Generator | None = None
) -> np.ndarray:
    """Draw the objects on a dark background (noisy when `rng` is given); HxWx3 uint8 RGB."""
    image = np.tile(np.array(BACKGROUND_RGB, dtype=np.uint8), (image_size, image_size, 1))
    if rng is not None:
        # Grey noise, one value for all channels: the same texture for a third of the sampling cost.
        image -= BACKGROUND_NOISE  # BACKGROUND_RGB >= BACKGROUND_NOISE, so neither step wraps around
        image += rng.integers(0, 2 * BACKGROUND_NOISE + 1, size=(image_size, image_size, 1), dtype=np.uint8)
    for obj in objects:
        _draw_object(image, obj)
    return image


def _draw_object(image: np.ndarray, obj: SceneObject) -> None:
    # Anti-aliasing keeps small shapes' outlines distinguishable (a circle from a square)
    # where hard pixel edges would turn both into the same blocky blob.
    colour = COLOURS[obj.colour]
    r = obj.radius
    if obj.shape == "circle":
        centre = (round(obj.x * _SUBPIXEL), round(obj.y * _SUBPIXEL))
        cv2.circle(image, centre, round(r * _SUBPIXEL), colour, -1, cv2.LINE_AA, SUBPIXEL_BITS)
        return
    if obj.shape == "square":
        outline = [(-r, -r), (r, -r), (r, r), (-r, r)]
    elif obj.shape == "triangle":
        outline = [(0, -r), (r, r), (-r, r)]
    elif obj.shape == "diamond":
        outline = [(0, -r), (r, 0), (0, r), (-r, 0)]
    elif obj.shape == "cross":
        arm = r / 3  # half the arm width: arms and notches both ~3 px on a small object at 64 px
        outline = [
            (-arm, -r), (arm, -r), (arm, -arm), (r, -arm),
            (r, arm), (arm, arm), (arm, r), (-arm, r),
            (-arm, arm), (-r, arm), (-r, -arm), (-arm, -arm),
        ]
    else:
        raise ValueError(f"unknown shape {obj.shape!r}")
    points = np.array(
        [(round((obj.x + dx) * _SUBPIXEL), round((obj.y + dy) * _SUBPIXEL)) for dx, dy in outline], dtype=np.int32
    )
    cv2.fillPoly(image, [points], colour, cv2.LINE_AA, SUBPIXEL_BITS)


def spatial_relation(a: SceneObject, b: SceneObject, axis_ratio: float = RELATION_AXIS_RATIO) -> str | None:
    """The unambiguous relation of `a` to `b` ("left of", ...), or None (see module doc); `axis_ratio` is how much
    longer the offset along the relation's axis must be than across it."""
    dx, dy = a.x - b.x, a.y - b.y
    reach = a.radius + b.radius
    if abs(dx) > reach and abs(dx) >= axis_ratio * abs(dy):
        return "left of" if dx < 0 else "right of"
    if abs(dy) > reach and abs(dy) >= axis_ratio * abs(dx):
        return "above" if dy < 0 else "below"  # image y grows downwards
    return None


def describe_scene(
    objects: list[SceneObject], rng: np.random.Generator, n_captions: int = CAPTIONS_PER_IMAGE
) -> list[tuple[str, tuple[int, ...]]]:
    """Captions about distinct subsets of two or three objects, with the indices each mentions.

    A related pair (see `spatial_relation`) is described with its relation, any other
    subset as a list ("a X, a Y and a Z"). Relational captions follow
    RELATIONAL_CAPTION_TARGETS where the scene allows; the rest are triples, then
    unrelated pairs. Indices are in order of mention (a relation's subject first).
    Raises SceneTooSimpleError when the scene has fewer than `n_captions` such subsets.
    """
    n = len(objects)
    pairs = list(itertools.combinations(range(n), 2))
    related = [pair for pair in pairs if spatial_relation(objects[pair[0]], objects[pair[1]]) is not None]
    unrelated = [pair for pair in pairs if pair not in related]
    triples = list(itertools.combinations(range(n), 3))
    if len(pairs) + len(triples) < n_captions:
        raise SceneTooSimpleError(f"{n} objects cannot give {n_captions} distinct captions")
    wanted = RELATIONAL_CAPTION_TARGETS[int(rng.integers(len(RELATIONAL_CAPTION_TARGETS)))]
    related = [related[k] for k in rng.permutation(len(related))]
    lists = [triples[k] for k in rng.permutation(len(triples))] + [unrelated[k] for k in rng.permutation(len(unrelated))]
    n_related = min(len(related), max(wanted, n_captions - len(lists)))
    subsets = related[:n_related] + lists[: n_captions - n_related]

    captions = []
    for subset_index in rng.permutation(len(subsets)):
        subset = subsets[subset_index]
        if subset in related:
            if rng.random() < 0.5:  # either object may be the subject
                subset = subset[::-1]
            subject, reference = objects[subset[0]], objects[subset[1]]
            template = RELATION_TEMPLATES[int(rng.integers(len(RELATION_TEMPLATES)))]
            text = template.format(
                a=_phrase(subject), rel=spatial_relation(subject, reference), b=_phrase(reference)
            )
        else:
            subset = tuple(int(i) for i in rng.permutation(subset))
            phrases = [f"a {_phrase(objects[i])}" for i in subset]
            template = LIST_TEMPLATES[int(rng.integers(len(LIST_TEMPLATES)))]
            text = template.format(objects=", ".join(phrases[:-1]) + " and " + phrases[-1])
        captions.append((text, tuple(subset)))
    return captions


def _phrase(obj: SceneObject) -> str:
    return f"{obj.size} {obj.colour} {obj.shape}"


def _split_code(split: str) -> int:
    """A number per split name, stable across runs and Python versions (unlike hash())."""
    return zlib.crc32(split.encode("utf-8"))


def _check_splits(split_sizes: dict[str, int]) -> None:
    if not split_sizes:
        raise ConfigError("split_sizes must name at least one split")
    for split, size in split_sizes.items():
        if not isinstance(split, str) or not re.fullmatch(r"[A-Za-z0-9_-]+", split):
            raise ConfigError(f"split names must be letters, digits, '_' or '-', got {split!r}")
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ConfigError(f"split_sizes[{split!r}] must be a positive integer, got {size!r}")


def _check_folders(caption_dir: Path, image_dir: Path) -> None:
    # Each folder is replaced by one rename, so one inside the other would lose its content.
    captions, images = caption_dir.resolve(), image_dir.resolve()
    if captions == images or captions in images.parents or images in captions.parents:
        raise ConfigError(
            f"caption_dir ({caption_dir}) and image_dir ({image_dir}) must be separate folders, "
            "neither inside the other"
        )


def generate_dataset(
    caption_dir: Path,
    image_dir: Path,
    *,
    seed: int,
    image_size: int,
    split_sizes: dict[str, int],
    min_objects: int,
    max_objects: int,
    jpeg_quality: int = 95,
    progress: bool = True,
) -> None:
    """Write the dataset in the caption-split layout; both folders appear whole or not at all.

    caption_dir gets {split}_caps.txt, {split}_ids.txt (an image index per caption line),
    id_mapping.json (index -> image file name) and scenes.jsonl (objects and the subset
    each caption mentions); image_dir gets the JPEG images. Image i of a split depends only
    on (seed, split, i).
    """
    caption_dir, image_dir = Path(caption_dir), Path(image_dir)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {seed!r}")
    _check_object_counts(min_objects, max_objects)
    _check_image_size(image_size)
    _check_splits(split_sizes)
    _check_folders(caption_dir, image_dir)
    if isinstance(jpeg_quality, bool) or not isinstance(jpeg_quality, int) or not 1 <= jpeg_quality <= 100:
        raise ConfigError(f"jpeg_quality must be an integer from 1 to 100, got {jpeg_quality!r}")

    id_mapping: dict[str, str] = {}
    with (
        atomic_path(caption_dir) as caption_tmp,
        atomic_path(image_dir) as image_tmp,
        progress_bar(total=sum(split_sizes.values()), desc="synthetic images", unit="img", disable=not progress) as bar,
    ):
        caption_tmp.mkdir()
        image_tmp.mkdir()
        with open(caption_tmp / "scenes.jsonl", "w", encoding="utf-8", newline="\n") as scenes_file:
            for split, n_images in split_sizes.items():
                caption_lines, id_lines = [], []
                for local_index in range(n_images):
                    index = len(id_mapping)
                    file_name = f"{split}_{local_index:06d}.jpg"
                    # Seeded per image, so an image does not depend on generation order or other splits.
                    rng = np.random.default_rng([seed, _split_code(split), local_index])
                    objects = sample_scene(rng, image_size, min_objects, max_objects)
                    captions = describe_scene(objects, rng)
                    bgr = cv2.cvtColor(render_scene(objects, image_size, rng), cv2.COLOR_RGB2BGR)
                    if not cv2.imwrite(str(image_tmp / file_name), bgr, [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality]):
                        raise OSError(f"could not write image {image_tmp / file_name}")
                    id_mapping[str(index)] = file_name
                    caption_lines += [text for text, _ in captions]
                    id_lines += [str(index)] * len(captions)
                    record = {
                        "index": index,
                        "file": file_name,
                        "split": split,
                        "objects": [vars(obj) for obj in objects],
                        "captions": [{"text": text, "objects": list(subset)} for text, subset in captions],
                    }
                    scenes_file.write(json.dumps(record) + "\n")
                    bar.update()
                _write_lines(caption_tmp / f"{split}_caps.txt", caption_lines)
                _write_lines(caption_tmp / f"{split}_ids.txt", id_lines)
        (caption_tmp / "id_mapping.json").write_text(json.dumps(id_mapping, indent=0) + "\n", encoding="utf-8")


def _write_lines(path: Path, lines: list[str]) -> None:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8", newline="\n")
