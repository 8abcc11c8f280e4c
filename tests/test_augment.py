"""Training augmentation and the datasets around it: the official crop and flip rules, captions that follow the
flip, draws fixed by (seed, epoch, caption index) whatever the loader, and images that embedding never augments."""

import dataclasses
import itertools
import re

import cv2
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from avse.config import AugmentConfig
from avse.data.augment import augment_pair, crop_box, item_uniforms, swap_left_right
from avse.data.dataset import ImageDataset, ImageSource, PairDataset, PreparedSplit, check_image_cache, to_tensor
from avse.data.images import resize_square
from avse.data.synthetic import render_scene, sample_scene, spatial_relation
from avse.data.tokenizer import CaptionTokenizer, train_wordpiece
from avse.errors import ConfigError, DataError
from avse.training.batches import Collate, GlobalBatchSampler
from avse.training.distributed import DistContext
from avse.training.seeding import Draw, derive_seed

CPU = torch.device("cpu")
OFF = AugmentConfig(crop=False, flip=False)
CAPTION = "a dog left of a cat"


# --- the crop box and the draws ---------------------------------------------------------------------------


def test_crop_box_takes_one_ratio_of_both_sides():
    # r = 0.6 + 0.4 u, each side int(r x side), the corner int(u x free positions).
    assert crop_box(100, 200, 0.0, 0.0, 0.0) == (0, 0, 60, 120)
    assert crop_box(100, 200, 0.5, 0.5, 0.25) == (10, 10, 80, 160)
    assert [crop_box(375, 500, u, 0.0, 0.0)[2:] for u in (0.0, 0.25, 0.5, 0.75)] == [(225, 300), (262, 350), (300, 400), (337, 450)]
    assert crop_box(375, 500, 0.5, 0.999, 0.999) == (74, 99, 300, 400)  # 75 and 100 free positions: the last never drawn
    assert crop_box(10, 20, 1.0, 0.7, 0.7) == (0, 0, 10, 20)  # the limit r = 1: the whole image, the corner 0


def test_crop_corners_are_the_positions_np_random_randint_draws_from():
    grid = np.arange(100) / 100  # uniforms in [0, 1)
    corners = {crop_box(10, 20, 0.5, u, v)[:2] for u in grid for v in grid}  # an 8 x 16 crop
    assert corners == {(top, left) for top in range(2) for left in range(4)}  # randint(2) x randint(4)


def test_item_draws_are_fixed_by_the_item_seed():
    assert np.array_equal(item_uniforms(5), item_uniforms(5))
    assert not np.array_equal(item_uniforms(5), item_uniforms(6))
    u = item_uniforms(derive_seed(0, Draw.AUGMENT, 0, 0))
    assert u.shape == (4,) and ((0 <= u) & (u < 1)).all()


# --- one pair -----------------------------------------------------------------------------------------------


def test_augmentation_is_the_crop_then_the_square_then_the_flip_with_the_caption():
    whole = np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    flips = set()
    for seed in range(16):
        u_ratio, u_top, u_left, u_flip = item_uniforms(seed)
        top, left, height, width = crop_box(30, 40, u_ratio, u_top, u_left)
        expected = resize_square(whole[top : top + height, left : left + width], 16, "stretch")
        flipped = bool(u_flip > 0.5)
        flips.add(flipped)
        image, caption = augment_pair(whole, CAPTION, 16, "stretch", AugmentConfig(), seed)
        np.testing.assert_array_equal(image, expected[:, ::-1] if flipped else expected)
        assert caption == ("a dog right of a cat" if flipped else CAPTION)
        # Each step on its own draws what it drew with the other on.
        image, caption = augment_pair(whole, CAPTION, 16, "stretch", AugmentConfig(flip=False), seed)
        np.testing.assert_array_equal(image, expected)
        assert caption == CAPTION
        image, caption = augment_pair(whole, CAPTION, 16, "stretch", AugmentConfig(crop=False, flip_captions="keep"), seed)
        plain = resize_square(whole, 16, "stretch")
        np.testing.assert_array_equal(image, plain[:, ::-1] if flipped else plain)
        assert caption == CAPTION  # `keep`: the official code's caption, unchanged
    assert flips == {True, False}


def test_no_augmentation_is_the_whole_image_made_square():
    whole = np.random.default_rng(1).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    for seed in range(8):
        image, caption = augment_pair(whole, CAPTION, 16, "crop", OFF, seed)
        np.testing.assert_array_equal(image, resize_square(whole, 16, "crop"))
        assert caption == CAPTION


# --- captions of flipped images -----------------------------------------------------------------------------


@pytest.mark.parametrize("caption, swapped", [
    ("a red circle left of a blue square", "a red circle right of a blue square"),
    ("there is a small green cross right of a white diamond", "there is a small green cross left of a white diamond"),
    ("Left of the door, a RIGHT turn", "Right of the door, a LEFT turn"),
    ("the leftmost boy waves his left-hand glove; the Rightmost one is right-handed",
     "the rightmost boy waves his right-hand glove; the Leftmost one is left-handed"),
    ("lefthand and righthanded, walking leftward then rightwards", "righthand and lefthanded, walking rightward then leftwards"),
    ("top-left corner (left)", "top-right corner (right)"),
    ("a bright, upright copyright sign; leftover lefty Wright alright rights leftist", None),
])
def test_left_and_right_swap_as_whole_words(caption, swapped):
    assert swap_left_right(caption) == (swapped or caption)


REAL_SWAPS = {
    "A young boy wearing a white tunic , white pants , and a yellow belt is standing on his left leg with his right leg extended in a karate pose .":
        "A young boy wearing a white tunic , white pants , and a yellow belt is standing on his right leg with his left leg extended in a karate pose .",
    "A right-handed pitcher for the Saints is throwing a pitch .": "A left-handed pitcher for the Saints is throwing a pitch .",
    "An officer in a black uniform and hat stands to the left of a large structure with other officers in the background .":
        "An officer in a black uniform and hat stands to the right of a large structure with other officers in the background .",
    "Road construction arrows are pointing left .": "Road construction arrows are pointing right .",
    # Words are not parsed: the verb "left" and the adverb "right" swap too.
    "A man in a black shirt sits beneath a 'no child left behind ' powerpoint presentation .":
        "A man in a black shirt sits beneath a 'no child right behind ' powerpoint presentation .",
    "Man in bright yellow vest displays bicycle safety information on street .":
        "Man in bright yellow vest displays bicycle safety information on street .",
    "A cowboy is riding a bull on a rodeo and is having trouble staying upright .":
        "A cowboy is riding a bull on a rodeo and is having trouble staying upright .",
}


def test_real_flickr30k_captions_swap_left_and_right(f30k_fixtures):
    lines = (f30k_fixtures / "test_caps.txt").read_text(encoding="utf-8").splitlines()
    assert set(REAL_SWAPS) <= set(lines)
    assert {line: swap_left_right(line) for line in REAL_SWAPS} == REAL_SWAPS
    changed = 0
    for line in lines:
        swapped = swap_left_right(line)
        assert swap_left_right(swapped) == line  # a flipped flip is the original
        words = {word.lower() for word in re.findall(r"[A-Za-z]+", line)}
        if not words & {"left", "right"}:
            assert swapped == line, line  # "bright", "upright", ... untouched
        changed += swapped != line
    assert changed == sum(1 for line in lines if re.search(r"(?i)(?<![a-z])(left|right)(?![a-z])", line)) > 30


def test_a_flipped_synthetic_image_is_the_mirrored_scene_with_swapped_relations():
    rng, size, related = np.random.default_rng(0), 64, 0
    for _ in range(20):
        scene = sample_scene(rng, size, 4, 4)
        mirrored = [dataclasses.replace(obj, x=size - 1 - obj.x) for obj in scene]
        # Every shape is mirror-symmetric: the flipped picture is the mirrored scene up to anti-aliased edges.
        expected = render_scene(mirrored, size).astype(int)
        difference = np.abs(np.fliplr(render_scene(scene, size)).astype(int) - expected)
        assert difference.max() <= 16 and (difference > 0).mean() < 0.08  # edges of four objects
        padded = np.pad(expected, ((1, 1), (1, 1), (0, 0)), mode="edge")
        window = np.stack([padded[i:i + size, j:j + size] for i in range(3) for j in range(3)])
        flat = (window.max(0) == window.min(0)).all(-1)  # no edge within a pixel
        assert not difference[flat].any()  # pixels differ on object edges only
        for a, b in itertools.permutations(range(len(scene)), 2):
            relation = spatial_relation(scene[a], scene[b])
            assert spatial_relation(mirrored[a], mirrored[b]) == (relation and swap_left_right(relation))
            related += relation in ("left of", "right of")
    assert related > 20


# --- datasets and loaders -----------------------------------------------------------------------------------


@pytest.fixture
def split(tmp_path) -> PreparedSplit:
    """Four cached 48 px images of noise, five captions each, with left or right."""
    cache = tmp_path / "train_images.npy"
    np.save(cache, np.random.default_rng(2).integers(0, 256, (4, 48, 48, 3), dtype=np.uint8))
    captions = [f"a shape {'left' if k % 2 else 'right'} of image {i}, caption {k}" for i in range(4) for k in range(5)]
    return PreparedSplit("train", captions, np.repeat(np.arange(4), 5), np.arange(4), [""] * 4, cache)


def test_an_items_augmentation_repeats_for_its_seed_epoch_and_index_and_changes_with_the_epoch(split):
    dataset = PairDataset(split, 16, "stretch", AugmentConfig())

    def item(epoch: int, index: int):
        return dataset[index, derive_seed(7, Draw.AUGMENT, epoch, index)]

    for index in range(len(dataset)):
        first, again, later = item(0, index), item(0, index), item(1, index)
        assert torch.equal(first[0], again[0]) and first[1:] == again[1:]
        assert first[2] == index // 5 and first[3] == derive_seed(7, Draw.AUGMENT, 0, index)  # the item carries its seed
        assert not torch.equal(first[0], later[0])
    sampler = GlobalBatchSampler(len(dataset), 4, DistContext(0, 0, 1, CPU), seed=7)
    sampler.set_epoch(3)
    assert all(seed == derive_seed(7, Draw.AUGMENT, 3, index) for index, seed in sampler)


@pytest.fixture
def augmenting_tokenizer(split, tmp_path) -> CaptionTokenizer:
    """A WordPiece tokenizer of the split's captions that augments half of the words of training captions."""
    return CaptionTokenizer(train_wordpiece(split.captions, tmp_path / "tokenizer", vocab_size=100), 16, augment=0.5)


def loader_batches(split: PreparedSplit, tokenize: CaptionTokenizer, workers: int, epochs: list[tuple[int, int]],
                   rank: int = 0, world: int = 1, steps: int = 3) -> list:
    """The first `steps` batches of each (epoch, start batch) in turn, from one loader kept as training keeps it."""
    dataset = PairDataset(split, 16, "stretch", AugmentConfig())
    sampler = GlobalBatchSampler(len(dataset), 4 // world, DistContext(rank, rank, world, CPU), seed=7)
    loader = DataLoader(dataset, batch_size=4 // world, sampler=sampler, collate_fn=Collate(tokenize),
                        num_workers=workers, persistent_workers=workers > 0, drop_last=True)
    batches = []
    for epoch, start in epochs:
        sampler.set_epoch(epoch, start)
        batches += [batch for batch, _ in zip(loader, range(steps))]
    return batches


def same_batches(a: list, b: list) -> bool:
    return len(a) == len(b) and all(all(torch.equal(x, y) for x, y in zip(p, q)) for p, q in zip(a, b))


def test_training_batches_are_the_same_with_loader_workers_processes_or_a_resume(split, augmenting_tokenizer):
    in_process = loader_batches(split, augmenting_tokenizer, 0, [(0, 0), (1, 0)])
    # persistent workers follow the epoch
    assert same_batches(loader_batches(split, augmenting_tokenizer, 2, [(0, 0), (1, 0)]), in_process)
    ranks = [loader_batches(split, augmenting_tokenizer, 0, [(0, 0), (1, 0)], rank, world=2) for rank in range(2)]
    # The ranks' captions are padded to their own longest: compare each rank's rows unpadded.
    for batch, parts in zip(in_process, zip(*ranks)):
        assert torch.equal(torch.cat([p[0] for p in parts]), batch[0]) and torch.equal(torch.cat([p[3] for p in parts]), batch[3])
        rows = [ids[mask.bool()] for p in parts for ids, mask in zip(p[1], p[2])]
        assert all(torch.equal(row, ids[mask.bool()]) for row, ids, mask in zip(rows, batch[1], batch[2]))
    resumed = loader_batches(split, augmenting_tokenizer, 2, [(1, 1)], steps=2)
    assert same_batches(resumed, in_process[4:])
    # The augmentation is on: the pixels are not the plain resized images, the captions not their plain tokens.
    images, input_ids, _, positions = in_process[0]
    unaugmented = torch.stack([ImageDataset(split, 16, "stretch")[position][0] for position in positions.tolist()])
    assert not torch.equal(images, unaugmented)
    plain = loader_batches(split, CaptionTokenizer(augmenting_tokenizer.tokenizer, 16), 0, [(0, 0)], steps=1)[0]
    assert torch.equal(plain[0], images) and not torch.equal(plain[1], input_ids)


def test_embedding_images_are_never_augmented(split):
    cache = np.load(split.cache)
    images = ImageDataset(split, 16, "stretch")
    for position in range(len(images)):
        image, got = images[position]
        assert got == position and torch.equal(image, to_tensor(resize_square(cache[position], 16, "stretch")))
        assert torch.equal(image, images[position][0])
    # A training pair with augmentation off is the same image; with it on, not.
    plain, augmented = PairDataset(split, 16, "stretch", OFF), PairDataset(split, 16, "stretch", AugmentConfig())
    for index in range(len(plain)):
        key = (index, derive_seed(0, Draw.AUGMENT, 0, index))
        assert torch.equal(plain[key][0], images[index // 5][0]) and plain[key][1] == split.captions[index]
        assert not torch.equal(augmented[key][0], images[index // 5][0])


@pytest.mark.parametrize("resize", ["stretch", "crop"])
def test_decoded_files_are_cropped_from_their_original_pixels(tmp_path, resize):
    original = np.random.default_rng(3).integers(0, 256, (20, 40, 3), dtype=np.uint8)
    cv2.imwrite(str(tmp_path / "wide.png"), cv2.cvtColor(original, cv2.COLOR_RGB2BGR))  # lossless
    split = PreparedSplit("train", [CAPTION], np.array([0]), np.array([0]), [str(tmp_path / "wide.png")], cache=None)
    source = ImageSource(split, 16, resize)
    whole = original if resize == "stretch" else original[:, 10:30]  # `crop`: the centre square, not resampled
    np.testing.assert_array_equal(source.whole(0), whole)
    np.testing.assert_array_equal(source[0], resize_square(original, 16, resize))
    seed = derive_seed(0, Draw.AUGMENT, 0, 0)
    image, caption = augment_pair(whole, CAPTION, 16, resize, AugmentConfig(), seed)
    item = PairDataset(split, 16, resize, AugmentConfig())[0, seed]
    assert torch.equal(item[0], to_tensor(image)) and item[1] == caption


# --- the image cache must fit the input -------------------------------------------------------------------


def test_an_image_cache_smaller_than_the_input_or_stale_is_refused(tmp_path):
    with pytest.raises(ConfigError) as err:
        check_image_cache(tmp_path, ["train"], 64, 224)
    assert str(err.value) == "data.cache_res: 64 is smaller than data.img_res: 224; prepare with -S data.cache_res=224 (or 0 to decode the JPEGs)"
    check_image_cache(tmp_path, ["train"], 224, 224)  # not prepared: PreparedSplit.load says so
    (tmp_path / "train.csv").write_text("image_id,image_file,image_path,caption\n")
    cache = tmp_path / "train_images.npy"
    np.save(cache, np.zeros((1, 64, 64, 3), np.uint8))
    check_image_cache(tmp_path, ["train"], 64, 32)
    for cache_res, message in ((224, "holds 64 px images, but data.cache_res is 224"), (0, "holds 64 px images, but data.cache_res is 0")):
        with pytest.raises(DataError) as err:
            check_image_cache(tmp_path, ["train"], cache_res, 32)
        assert str(err.value) == f"{cache}: {message}; prepare again with data.cache_res: {cache_res}"
    cache.unlink()
    check_image_cache(tmp_path, ["train"], 0, 32)
    with pytest.raises(DataError, match=re.escape(f"{cache}: does not exist, but data.cache_res is 64")):
        check_image_cache(tmp_path, ["train"], 64, 32)
