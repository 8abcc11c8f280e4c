"""Tests for the procedurally generated dataset: layout, determinism, caption truth, rendering."""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

import cv2
import numpy as np
import pytest

from avse.data import synthetic
from avse.data.synthetic import (
    COLOURS,
    LIST_TEMPLATES,
    RELATION_TEMPLATES,
    RELATIONS,
    SHAPES,
    SIZES,
    SceneObject,
    SceneTooSimpleError,
    describe_scene,
    generate_dataset,
    render_scene,
    sample_scene,
    spatial_relation,
)
from avse.errors import ConfigError

IMAGE_SIZE = 64
SPLIT_SIZES = {"train": 24, "dev": 8, "test": 8}

_OBJECT = rf"({'|'.join(SIZES)}) ({'|'.join(COLOURS)}) ({'|'.join(SHAPES)})"
_RELATION = rf"({'|'.join(RELATIONS)})"
_LIST = rf"a {_OBJECT}(?:, a {_OBJECT})? and a {_OBJECT}"


def _template_regex(template: str) -> re.Pattern[str]:
    pattern = re.escape(template)
    for field, regex in (("objects", _LIST), ("a", _OBJECT), ("b", _OBJECT), ("rel", _RELATION)):
        pattern = pattern.replace(re.escape("{" + field + "}"), regex)
    return re.compile(pattern)


LIST_PATTERNS = [_template_regex(t) for t in LIST_TEMPLATES]
RELATION_PATTERNS = [_template_regex(t) for t in RELATION_TEMPLATES]


def _parse(caption: str) -> tuple[list[tuple[str, str, str]], str | None]:
    """The (size, colour, shape) of each mentioned object, and the relation if any."""
    for pattern in LIST_PATTERNS:
        if match := pattern.fullmatch(caption):
            words = [word for word in match.groups() if word is not None]
            return [tuple(words[i : i + 3]) for i in range(0, len(words), 3)], None
    for pattern in RELATION_PATTERNS:
        if match := pattern.fullmatch(caption):
            size_a, colour_a, shape_a, relation, size_b, colour_b, shape_b = match.groups()
            return [(size_a, colour_a, shape_a), (size_b, colour_b, shape_b)], relation
    raise AssertionError(f"caption matches no template: {caption!r}")


def _generate(root: Path, seed: int = 7, split_sizes: dict[str, int] = SPLIT_SIZES) -> tuple[Path, Path]:
    caption_dir, image_dir = root / "captions", root / "images"
    generate_dataset(
        caption_dir,
        image_dir,
        seed=seed,
        image_size=IMAGE_SIZE,
        split_sizes=split_sizes,
        min_objects=4,
        max_objects=5,
        progress=False,
    )
    return caption_dir, image_dir


def _files(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def _read_lines(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    assert text.endswith("\n")
    return text[:-1].split("\n")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[dict]]:
    caption_dir, image_dir = _generate(tmp_path_factory.mktemp("synthetic"))
    scenes = [json.loads(line) for line in _read_lines(caption_dir / "scenes.jsonl")]
    return caption_dir, image_dir, scenes


def test_same_arguments_give_identical_files_and_another_seed_differs(
    tmp_path: Path, dataset: tuple[Path, Path, list[dict]]
) -> None:
    caption_dir, image_dir, _ = dataset
    again_captions, again_images = _generate(tmp_path / "again")
    assert _files(again_captions) == _files(caption_dir)
    assert _files(again_images) == _files(image_dir)

    other_captions, other_images = _generate(tmp_path / "other", seed=8)
    assert (other_captions / "train_caps.txt").read_bytes() != (caption_dir / "train_caps.txt").read_bytes()
    other_files, files = _files(other_images), _files(image_dir)
    assert other_files.keys() == files.keys()
    assert all(other_files[name] != files[name] for name in files)


def test_images_do_not_depend_on_other_splits(tmp_path: Path, dataset: tuple[Path, Path, list[dict]]) -> None:
    _, image_dir, _ = dataset
    _, resized_images = _generate(tmp_path, split_sizes={"train": 3, "test": SPLIT_SIZES["test"]})
    for name in (f"test_{i:06d}.jpg" for i in range(SPLIT_SIZES["test"])):
        assert (resized_images / name).read_bytes() == (image_dir / name).read_bytes()


def test_layout_is_the_caption_split_layout(dataset: tuple[Path, Path, list[dict]]) -> None:
    caption_dir, image_dir, scenes = dataset
    id_mapping = json.loads((caption_dir / "id_mapping.json").read_text(encoding="utf-8"))
    assert list(id_mapping) == [str(i) for i in range(sum(SPLIT_SIZES.values()))]
    assert len(set(id_mapping.values())) == len(id_mapping)

    all_ids: list[int] = []
    for split, n_images in SPLIT_SIZES.items():
        captions = _read_lines(caption_dir / f"{split}_caps.txt")
        ids = [int(line) for line in _read_lines(caption_dir / f"{split}_ids.txt")]
        assert len(captions) == len(ids) == 5 * n_images
        for start in range(0, len(ids), 5):
            image_ids = ids[start : start + 5]
            assert len(set(image_ids)) == 1
            assert len(set(captions[start : start + 5])) == 5
            assert id_mapping[str(image_ids[0])].startswith(f"{split}_")
        assert len(set(ids)) == n_images
        all_ids += ids
    assert sorted(set(all_ids)) == [int(key) for key in id_mapping]

    assert sorted(path.name for path in image_dir.iterdir()) == sorted(id_mapping.values())
    for file_name in id_mapping.values():
        image = cv2.imread(str(image_dir / file_name), cv2.IMREAD_UNCHANGED)
        assert image is not None and image.shape == (IMAGE_SIZE, IMAGE_SIZE, 3)

    assert [scene["index"] for scene in scenes] == list(range(len(id_mapping)))
    for scene in scenes:
        assert id_mapping[str(scene["index"])] == scene["file"]
        captions = _read_lines(caption_dir / f"{scene['split']}_caps.txt")
        ids = _read_lines(caption_dir / f"{scene['split']}_ids.txt")
        assert [c["text"] for c in scene["captions"]] == [c for c, i in zip(captions, ids) if int(i) == scene["index"]]


def test_captions_describe_what_is_drawn(dataset: tuple[Path, Path, list[dict]]) -> None:
    _, image_dir, scenes = dataset
    palette = {**COLOURS, "background": synthetic.BACKGROUND_RGB}
    n_relational = n_triples = 0
    for scene in scenes:
        objects = [SceneObject(**obj) for obj in scene["objects"]]
        assert 4 <= len(objects) <= 5
        assert len({(obj.colour, obj.shape) for obj in objects}) == len(objects)
        rgb = cv2.cvtColor(cv2.imread(str(image_dir / scene["file"])), cv2.COLOR_BGR2RGB).astype(int)
        subsets = [frozenset(caption["objects"]) for caption in scene["captions"]]
        assert len(set(subsets)) == 5
        for caption in scene["captions"]:
            mentioned, relation = _parse(caption["text"])
            indices = caption["objects"]
            assert len(indices) == len(mentioned) < len(objects)
            for (size, colour, shape), index in zip(mentioned, indices):
                obj = objects[index]
                assert (size, colour, shape) == (obj.size, obj.colour, obj.shape)
                pixel = rgb[round(obj.y), round(obj.x)]
                distances = {name: np.abs(pixel - np.array(value)).max() for name, value in palette.items()}
                assert min(distances, key=distances.get) == colour, (scene["file"], caption["text"], pixel)
                assert distances[colour] <= 40
            if relation is None:
                # A list names an unrelated pair, or three objects.
                assert len(indices) == 3 or spatial_relation(objects[indices[0]], objects[indices[1]]) is None
                n_triples += len(indices) == 3
                continue
            n_relational += 1
            a, b = objects[indices[0]], objects[indices[1]]
            dx, dy = b.x - a.x, b.y - a.y  # positive when a is left of / above b
            separations = {"left of": (dx, dy), "right of": (-dx, dy), "above": (dy, dx), "below": (-dy, dx)}
            along, across = separations[relation]
            assert along > a.radius + b.radius, (scene["file"], caption["text"])
            assert along >= synthetic.RELATION_AXIS_RATIO * abs(across), (scene["file"], caption["text"])
        related_pairs = [pair for pair in itertools.combinations(objects, 2) if spatial_relation(*pair)]
        relational_captions = sum(bool(_parse(caption["text"])[1]) for caption in scene["captions"])
        assert min(2, len(related_pairs)) <= relational_captions <= 3
    assert n_relational >= 2 * len(scenes) and n_triples >= len(scenes)


def test_min_objects_below_four_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="min_objects"):
        generate_dataset(
            tmp_path / "captions",
            tmp_path / "images",
            seed=0,
            image_size=IMAGE_SIZE,
            split_sizes={"train": 2},
            min_objects=3,
            max_objects=4,
            progress=False,
        )
    with pytest.raises(ConfigError, match="min_objects"):
        sample_scene(np.random.default_rng(0), IMAGE_SIZE, 3, 4)
    assert list(tmp_path.iterdir()) == []


def test_scenes_do_not_overlap_and_stay_inside_the_image() -> None:
    rng = np.random.default_rng(0)
    background = np.array(synthetic.BACKGROUND_RGB)
    for _ in range(200):
        objects = sample_scene(rng, IMAGE_SIZE, 4, synthetic.MAX_OBJECTS)
        masks = []
        for obj in objects:
            assert 0 <= obj.x - obj.radius and obj.x + obj.radius <= IMAGE_SIZE - 1
            assert 0 <= obj.y - obj.radius and obj.y + obj.radius <= IMAGE_SIZE - 1
            masks.append((render_scene([obj], IMAGE_SIZE) != background).any(axis=2))
        for first, second in itertools.combinations(masks, 2):
            assert not (first & second).any()


def test_relations_are_stated_only_when_unambiguous() -> None:
    def small(x: float, y: float) -> SceneObject:
        return SceneObject("circle", "red", "small", x, y, 4.5)

    assert spatial_relation(small(10, 30), small(40, 34)) == "left of"
    assert spatial_relation(small(40, 34), small(10, 30)) == "right of"
    assert spatial_relation(small(30, 10), small(34, 40)) == "above"
    assert spatial_relation(small(34, 40), small(30, 10)) == "below"
    assert spatial_relation(small(10, 10), small(40, 40)) is None  # diagonal
    assert spatial_relation(small(10, 10), small(40, 26)) is None  # not twice as far across as down
    assert spatial_relation(small(10, 10), small(18, 10)) is None  # extents overlap along the axis

    # Without related pairs every caption is a list; three objects give only four subsets.
    diagonal = [small(10, 10), small(30, 30), small(50, 50), small(58, 58)]
    captions = describe_scene(diagonal, np.random.default_rng(0))
    assert len(captions) == 5 and all(_parse(text)[1] is None for text, _ in captions)
    assert sorted(len(indices) for _, indices in captions) == [2, 3, 3, 3, 3]
    with pytest.raises(SceneTooSimpleError):
        describe_scene(diagonal[:3], np.random.default_rng(0))


def test_interrupted_generation_leaves_previous_output_untouched(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    caption_dir, image_dir = _generate(tmp_path, split_sizes={"test": 2})
    before = _files(caption_dir), _files(image_dir)
    calls = 0

    def failing_render(*args: object, **kwargs: object) -> np.ndarray:
        nonlocal calls
        calls += 1
        if calls > 3:
            raise RuntimeError("interrupted")
        return render_scene(*args, **kwargs)

    monkeypatch.setattr(synthetic, "render_scene", failing_render)
    with pytest.raises(RuntimeError, match="interrupted"):
        _generate(tmp_path, seed=1, split_sizes={"train": 10})
    assert (_files(caption_dir), _files(image_dir)) == before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["captions", "images"]


def test_vocabulary_takes_the_article_a() -> None:
    assert all(word[0] not in "aeiou" for word in [*COLOURS, *SHAPES, *SIZES])
