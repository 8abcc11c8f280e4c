"""A held-out scene set: image-caption data independent of the embedded benchmark.

The project's defaults were tuned on the embedded dataset (`avse/data/synthetic.py`);
a result measured only there can hide a regression that other data shows. This script
writes a procedurally generated set in the Flickr30K caption-split layout
(docs/data.md), so that it goes through `prepare` as `data.dataset: f30k`:

    OUT/captions/{train,dev,test}_caps.txt   one caption per line, 5 per image
    OUT/captions/{train,dev,test}_ids.txt    the image id of each caption line
    OUT/captions/id_mapping.json             image id -> file name
    OUT/captions/scenes.jsonl                objects and captions of every image (for analysis)
    OUT/images/*.jpg                         the images

What differs from the embedded generator, on purpose:

* images are 48 px (not 64) and hold exactly 3 objects (not 4 or more);
* shapes: star, hexagon, ring, pentagon, trapezoid (embedded: circle, square,
  triangle, cross, diamond);
* colours: orange, cyan, magenta, grey, lime (embedded: red, green, blue, yellow,
  purple, white), on a dark brown background (embedded: dark blue-grey);
* sizes small / large at 20 % and 36 % of the side (embedded 14 % and 28 %);
* every size, colour, shape and relation has synonyms drawn per mention
  ("little", "big", "aqua", "fuchsia", "gray", "hoop", "trapezium", ...), and the
  relations are phrased differently ("to the left of", "higher than", ...);
* caption templates are different, and captions name 1, 2 or 3 of the objects (a
  caption may describe the whole scene), a related pair with its relation.

Image i of a split depends only on (seed, split, i). Typical use:

    python benchmarks/heldout_scenes.py --out data/heldout --seed 0 --train 20000 --dev 1000 --test 1000
    avse prepare -S data.dataset=f30k -S data.root=data/heldout/captions -S data.images=data/heldout/images -S data.img_res=48 -S data.cache_res=48

and train, embed and evaluate with the same overrides (see benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import json
import math
import zlib
from pathlib import Path

import cv2
import numpy as np

from avse.data.synthetic import SUBPIXEL_BITS, SceneObject, spatial_relation  # how objects are held and drawn; what is drawn differs

SHAPES: dict[str, tuple[str, ...]] = {
    "star": ("star",),
    "hexagon": ("hexagon", "six-sided shape"),
    "ring": ("ring", "hoop"),
    "pentagon": ("pentagon",),
    "trapezoid": ("trapezoid", "trapezium"),
}
# RGB, far apart from each other and from the embedded generator's colours.
COLOURS: dict[str, tuple[int, int, int]] = {
    "orange": (255, 135, 0),
    "cyan": (0, 225, 230),
    "magenta": (235, 0, 190),
    "grey": (150, 150, 150),
    "lime": (165, 250, 20),
}
COLOUR_WORDS: dict[str, tuple[str, ...]] = {
    "orange": ("orange", "amber"),
    "cyan": ("cyan", "aqua"),
    "magenta": ("magenta", "fuchsia"),
    "grey": ("grey", "gray"),
    "lime": ("lime", "chartreuse"),
}
SIZES: dict[str, float] = {"small": 0.20, "large": 0.36}  # full extent as a share of the side
SIZE_WORDS: dict[str, tuple[str, ...]] = {"small": ("small", "little", "tiny"), "large": ("large", "big", "huge")}
RELATION_WORDS: dict[str, tuple[str, ...]] = {
    "left of": ("to the left of", "on the left of"),
    "right of": ("to the right of", "on the right of"),
    "above": ("higher than", "over"),
    "below": ("lower than", "beneath"),
}
LIST_TEMPLATES = ("we can see {objects}", "a picture showing {objects}", "{objects} on a dark ground", "this scene has {objects}")
RELATION_TEMPLATES = ("{a} sits {rel} {b}", "one can see {a} {rel} {b}", "{a} placed {rel} {b}")

OBJECTS_PER_IMAGE = 3
CAPTIONS_PER_IMAGE = 5
BACKGROUND_RGB = (34, 24, 14)
BACKGROUND_NOISE = 8
OBJECT_GAP = 2.0  # px between bounding circles
EDGE_MARGIN = 1.0
RELATION_AXIS_RATIO = 1.5
_SUB = 1 << SUBPIXEL_BITS


def sample_scene(rng: np.random.Generator, image_size: int) -> list[SceneObject]:
    """Three non-overlapping objects with distinct (colour, shape) pairs, fully inside the image."""
    kinds = [(c, s) for c in COLOURS for s in SHAPES]
    while True:
        objects: list[SceneObject] = []
        for k in rng.permutation(len(kinds))[:OBJECTS_PER_IMAGE]:
            colour, shape = kinds[k]
            size = ("small", "large")[int(rng.integers(2))]
            r = SIZES[size] * image_size / 2
            lo, hi = r + EDGE_MARGIN, image_size - 1 - r - EDGE_MARGIN
            for _ in range(64):
                x, y = lo + (hi - lo) * rng.random(), lo + (hi - lo) * rng.random()
                if all(math.hypot(x - o.x, y - o.y) >= 1.2 * (r + o.radius) + OBJECT_GAP for o in objects):
                    objects.append(SceneObject(shape, colour, size, x, y, r))
                    break
            else:
                break
        if len(objects) == OBJECTS_PER_IMAGE:
            return objects


def _polygon(n: int, r: float, phase: float) -> list[tuple[float, float]]:
    return [(r * math.cos(phase + 2 * math.pi * k / n), r * math.sin(phase + 2 * math.pi * k / n)) for k in range(n)]


def _fill(image: np.ndarray, obj: SceneObject, outline: list[tuple[float, float]], colour) -> None:
    pts = np.array([(round((obj.x + dx) * _SUB), round((obj.y + dy) * _SUB)) for dx, dy in outline], dtype=np.int32)
    cv2.fillPoly(image, [pts], colour, cv2.LINE_AA, SUBPIXEL_BITS)


def render_scene(objects: list[SceneObject], image_size: int, rng: np.random.Generator) -> np.ndarray:
    """HxWx3 uint8 RGB: objects drawn anti-aliased on a noisy dark background."""
    image = np.tile(np.array(BACKGROUND_RGB, dtype=np.int16), (image_size, image_size, 1))
    image += rng.integers(-BACKGROUND_NOISE, BACKGROUND_NOISE + 1, size=(image_size, image_size, 1), dtype=np.int16)
    image = np.clip(image, 0, 255).astype(np.uint8)
    for obj in objects:
        colour = COLOURS[obj.colour]
        r = obj.radius
        if obj.shape == "ring":
            centre = (round(obj.x * _SUB), round(obj.y * _SUB))
            cv2.circle(image, centre, round(0.8 * r * _SUB), colour, max(2, round(0.4 * r)), cv2.LINE_AA, SUBPIXEL_BITS)
        elif obj.shape == "hexagon":
            _fill(image, obj, _polygon(6, r, 0.0), colour)
        elif obj.shape == "pentagon":
            _fill(image, obj, _polygon(5, r, -math.pi / 2), colour)
        elif obj.shape == "star":
            outer, inner = _polygon(5, r, -math.pi / 2), _polygon(5, 0.45 * r, -math.pi / 2 + math.pi / 5)
            _fill(image, obj, [p for pair in zip(outer, inner) for p in pair], colour)
        elif obj.shape == "trapezoid":
            _fill(image, obj, [(-0.45 * r, -0.7 * r), (0.45 * r, -0.7 * r), (r, 0.7 * r), (-r, 0.7 * r)], colour)
        else:
            raise ValueError(obj.shape)
    return image


def _pick(rng: np.random.Generator, words: tuple[str, ...]) -> str:
    return words[int(rng.integers(len(words)))]


def _phrase(rng: np.random.Generator, obj: SceneObject) -> str:
    words = f"{_pick(rng, SIZE_WORDS[obj.size])} {_pick(rng, COLOUR_WORDS[obj.colour])} {_pick(rng, SHAPES[obj.shape])}"
    return ("an " if words[0] in "aeiou" else "a ") + words


def describe_scene(rng: np.random.Generator, objects: list[SceneObject]) -> list[tuple[str, list[int]]]:
    """Five distinct captions, each naming 1-3 objects (a related pair with its relation)."""
    captions: list[tuple[str, list[int]]] = []
    texts: set[str] = set()
    while len(captions) < CAPTIONS_PER_IMAGE:
        n = int(rng.choice([1, 2, 3], p=[0.15, 0.5, 0.35]))
        subset = [int(i) for i in rng.permutation(len(objects))[:n]]
        rel = spatial_relation(objects[subset[0]], objects[subset[1]], RELATION_AXIS_RATIO) if n == 2 else None
        if rel is not None and rng.random() < 0.75:
            text = _pick(rng, RELATION_TEMPLATES).format(
                a=_phrase(rng, objects[subset[0]]), rel=_pick(rng, RELATION_WORDS[rel]), b=_phrase(rng, objects[subset[1]])
            )
        else:
            phrases = [_phrase(rng, objects[i]) for i in subset]
            listed = phrases[0] if n == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
            text = _pick(rng, LIST_TEMPLATES).format(objects=listed)
        if text not in texts:
            texts.add(text)
            captions.append((text, subset))
    return captions


def generate(out: Path, seed: int, image_size: int, splits: dict[str, int], jpeg_quality: int = 95) -> None:
    caption_dir, image_dir = out / "captions", out / "images"
    caption_dir.mkdir(parents=True, exist_ok=False)
    image_dir.mkdir(parents=True, exist_ok=False)
    id_mapping: dict[str, str] = {}
    with open(caption_dir / "scenes.jsonl", "w", encoding="utf-8") as scenes:
        for split, n_images in splits.items():
            caps, ids = [], []
            for i in range(n_images):
                index = len(id_mapping)
                name = f"{split}_{i:06d}.jpg"
                rng = np.random.default_rng([seed, zlib.crc32(split.encode()), i])
                objects = sample_scene(rng, image_size)
                captions = describe_scene(rng, objects)
                bgr = cv2.cvtColor(render_scene(objects, image_size, rng), cv2.COLOR_RGB2BGR)
                if not cv2.imwrite(str(image_dir / name), bgr, [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality]):
                    raise OSError(f"could not write {image_dir / name}")
                id_mapping[str(index)] = name
                caps += [t for t, _ in captions]
                ids += [str(index)] * len(captions)
                scenes.write(json.dumps({"index": index, "file": name, "split": split,
                                         "objects": [vars(o) for o in objects],
                                         "captions": [{"text": t, "objects": s} for t, s in captions]}) + "\n")
            (caption_dir / f"{split}_caps.txt").write_text("".join(c + "\n" for c in caps), encoding="utf-8")
            (caption_dir / f"{split}_ids.txt").write_text("".join(c + "\n" for c in ids), encoding="utf-8")
    (caption_dir / "id_mapping.json").write_text(json.dumps(id_mapping, indent=0) + "\n", encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="new folder: gets captions/ and images/")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=48)
    parser.add_argument("--train", type=int, default=10000, help="training images (5 captions each)")
    parser.add_argument("--dev", type=int, default=1000, help="dev images")
    parser.add_argument("--test", type=int, default=1000, help="test images (1K protocol at 1000)")
    args = parser.parse_args()
    generate(args.out, args.seed, args.image_size, {"train": args.train, "dev": args.dev, "test": args.test})
    print(f"wrote {args.train + args.dev + args.test} images to {args.out}")


if __name__ == "__main__":
    main()
