"""The prepare step: validate a raw dataset and write its normalised, ready-to-train form.

Output folder (written atomically: all of it or none of it):
    {split}.csv          one row per caption: image_id, image_file, image_path, caption;
                         the captions of an image are consecutive, images in first-seen order
    {split}_images.npy   optional uint8 cache [n_images, cache_res, cache_res, 3] in the same image order: whole
                         images, stretched or centre-cropped to a square per `data.resize`
    stats.json           counts and caption-length statistics per split (in word pieces too, with the
                         trained tokenizer), and how many dev images were carved from train (data
                         with no dev split)
    dropped.csv          images dropped with `data.on_bad_image: skip`, and why
    tokenizer/           WordPiece vocabulary trained on the train captions (random text backbone)
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from transformers import PreTrainedTokenizerBase

from avse.config import Config
from avse.data.dataset import PreparedSplit
from avse.data.formats import (
    CAPTIONS_PER_IMAGE,
    EVAL_SPLITS,
    Caption,
    Problem,
    RawDataset,
    RawSplit,
    read_dataset,
    resolve_image,
)
from avse.data.images import Resize, load_rgb, resize_square
from avse.data.tokenizer import piece_lengths
from avse.errors import DataError
from avse.io import atomic_path
from avse.progress import progress as progress_bar

log = logging.getLogger(__name__)

MAX_LISTED_PROBLEMS = 20
INDEX_COLUMNS = ("image_id", "image_file", "image_path", "caption")


@dataclass(frozen=True)
class DroppedImage:
    split: str
    image_id: int
    path: str
    reason: str
    captions: int


def prepared_dir(config: Config) -> Path:
    return Path("data/prepared") / config.data.dataset


def prepare(config: Config, out_dir: Path, *, tokenizer_builder=None, progress: bool = True) -> dict:
    """Validate `data.root` + `data.images` and write the prepared dataset to `out_dir`.

    `tokenizer_builder(train_captions, folder)` writes a tokenizer into `folder` and returns it;
    it is called only when given (a randomly initialised text backbone needs its own vocabulary),
    and then the stats also count each split's captions by length in its word pieces.
    Returns the statistics written to `stats.json`. Raises DataError listing the problems
    (the first MAX_LISTED_PROBLEMS and a count of the rest) and writes nothing when the
    input is bad.
    """
    data = config.data
    raw = read_dataset(Path(data.root), data.dataset, data.format)
    carved = carve_dev_split(raw, data.dev_images)
    problems = list(raw.problems) + check_captions(raw)
    image_dir = Path(data.images)

    with atomic_path(out_dir) as tmp:
        tmp.mkdir(parents=True)
        dropped: list[DroppedImage] = []
        splits: dict[str, list[Caption]] = {}
        for name, split in raw.splits.items():
            groups = group_by_image(split.captions)
            known = [image_id for image_id in groups if image_id in raw.id_to_file]
            paths = [resolve_image(image_dir, raw.id_to_file[image_id]) for image_id in known]
            bad = scan_images(paths, data.cache_res, data.resize, tmp / f"{name}_images.npy", desc=f"images {name}", progress=progress)
            for image_id, path, reason in ((known[i], paths[i], reason) for i, reason in bad.items()):
                if data.on_bad_image == "skip":
                    dropped.append(DroppedImage(name, image_id, str(path), reason, len(groups[image_id])))
                else:
                    problems.append(Problem(str(path), f"{reason} (image id {image_id}, split {name})"))
            keep = [image_id for i, image_id in enumerate(known) if i not in bad]
            splits[name] = [caption for image_id in keep for caption in groups[image_id]]
            if bad and data.cache_res and data.on_bad_image == "skip":
                _drop_cache_rows(tmp / f"{name}_images.npy", sorted(bad))
        if problems:
            raise DataError(format_problems(problems, data.root))
        for name, captions in splits.items():
            if not captions:
                raise DataError(f"{data.root}: split {name} has no usable captions left")
            write_index(tmp / f"{name}.csv", captions, raw, image_dir)
        write_dropped(tmp / "dropped.csv", dropped)
        tokenizer = None
        if tokenizer_builder is not None and "train" in splits:
            tokenizer = tokenizer_builder([c.text for c in splits["train"]], tmp / "tokenizer")
        elif tokenizer_builder is not None:
            log.warning("no train split: no tokenizer is built, so this dataset can be evaluated but not trained on")
        stats = {name: caption_stats(captions, tokenizer) for name, captions in splits.items()}
        stats["dataset"] = data.dataset
        stats["dev_carved_from_train"] = carved
        stats["dropped_images"] = len(dropped)
        (tmp / "stats.json").write_text(json.dumps(stats, indent=2, sort_keys=True) + "\n")
    if dropped:
        log.warning("dropped %d bad images with their captions; see %s", len(dropped), out_dir / "dropped.csv")
    return stats


def carve_dev_split(raw: RawDataset, images: int) -> int:
    """Move `images` train images (with their captions) into a new dev split when the data has none.

    The official Flickr30K and COCO files ship train + test only, and training selects its
    model on dev, never on test. The images are those whose ids have the smallest SHA-256, among
    train images with CAPTIONS_PER_IMAGE captions (an evaluation split needs them): the choice
    depends neither on the file's order nor on the machine, and a smaller carve is a subset of
    a larger one. Returns the number of images carved (0 when there is a dev split already,
    no train split, the files have problems, or `images` is 0). Raises DataError when train has too few such images.
    """
    if images == 0 or raw.problems or "dev" in raw.splits or "train" not in raw.splits:
        return 0  # with problems (a dev file that could not be read, say), those are what to report
    train = raw.splits["train"]
    counts = Counter(c.image_id for c in train.captions)
    eligible = [image_id for image_id, count in counts.items() if count == CAPTIONS_PER_IMAGE and image_id >= 0]
    if images >= len(eligible):
        raise DataError(
            f"data.dev_images: {images} images asked for the dev split, but train has only {len(eligible)} images "
            f"with {CAPTIONS_PER_IMAGE} captions (and must keep some): ask for fewer"
        )
    chosen = set(sorted(eligible, key=lambda image_id: hashlib.sha256(str(image_id).encode()).digest())[:images])
    raw.splits["dev"] = RawSplit("dev", [c for c in train.captions if c.image_id in chosen])
    train.captions = [c for c in train.captions if c.image_id not in chosen]
    log.info("no dev split in the data: carved %d of %d train images (%d captions) as dev (data.dev_images)",
             images, len(counts), len(raw.splits["dev"].captions))
    return images


def check_captions(raw: RawDataset) -> list[Problem]:
    """Caption-level rules: empty captions, unknown image ids, images in two splits, 5 captions per evaluation
    image, empty splits."""
    problems = []
    unknown_reported: set[int] = set()
    split_of: dict[int, str] = {}  # image id -> the first split that uses it
    for name, split in raw.splits.items():
        if not split.captions:
            problems.append(Problem(f"{raw.mapping_source}", f"split {name} is empty"))
            continue
        shared: set[int] = set()  # image ids of this split already reported as used by an earlier split
        for caption in split.captions:
            if not caption.text.strip():
                problems.append(Problem(caption.where, "empty caption"))
            owner = split_of.setdefault(caption.image_id, name)
            if owner != name and caption.image_id >= 0 and caption.image_id not in shared:
                shared.add(caption.image_id)  # an evaluation image seen in training would inflate its results
                problems.append(Problem(caption.where, f"image id {caption.image_id} is also in split {owner}; an image belongs to one split"))
            if caption.image_id >= 0 and caption.image_id not in raw.id_to_file and caption.image_id not in unknown_reported:
                unknown_reported.add(caption.image_id)
                problems.append(Problem(caption.where, f"image id {caption.image_id} is not in {raw.mapping_source}"))
        if name in EVAL_SPLITS:
            counts = Counter(c.image_id for c in split.captions)
            for image_id, count in counts.items():
                if count != CAPTIONS_PER_IMAGE:
                    first = next(c for c in split.captions if c.image_id == image_id)
                    problems.append(Problem(
                        first.where,
                        f"image id {image_id} has {count} captions in evaluation split {name}, expected {CAPTIONS_PER_IMAGE}",
                    ))
    return problems


def group_by_image(captions: list[Caption]) -> dict[int, list[Caption]]:
    """Captions grouped by image id, images in first-seen order, caption order kept."""
    groups: dict[int, list[Caption]] = defaultdict(list)
    for caption in captions:
        groups[caption.image_id].append(caption)
    return dict(groups)


def scan_images(paths: list[Path], cache_res: int, resize: Resize, cache_path: Path, *, desc: str, progress: bool) -> dict[int, str]:
    """Decode every image once (and fill the cache with whole images, made square per `resize`, if `cache_res`);
    return {position: reason} for bad ones."""
    cache = None
    if cache_res:
        cache = np.lib.format.open_memmap(cache_path, mode="w+", dtype=np.uint8, shape=(len(paths), cache_res, cache_res, 3))

    def load(position: int) -> str | None:
        try:
            image = load_rgb(paths[position])
        except DataError as err:
            return str(err).removeprefix(f"{paths[position]}: ")
        if cache is not None:
            cache[position] = resize_square(image, cache_res, resize)
        return None

    bad = {}
    workers = min(8, (os.cpu_count() or 1) * 2)
    with ThreadPoolExecutor(workers) as pool:
        results = pool.map(load, range(len(paths)), chunksize=64)
        try:
            for position, reason in enumerate(progress_bar(results, total=len(paths), desc=desc, disable=not progress, unit="img")):
                if reason is not None:
                    bad[position] = reason
        except BaseException:  # interrupted: drop the images not started, wait only for those loading
            pool.shutdown(cancel_futures=True)
            raise
    if cache is not None:
        cache.flush()
    return bad


def _drop_cache_rows(cache_path: Path, rows: list[int]) -> None:
    """Rewrite the cache without `rows`, a slice at a time (a COCO-sized cache does not fit in memory)."""
    cache = np.load(cache_path, mmap_mode="r")
    keep = np.setdiff1d(np.arange(len(cache)), rows)
    compact_path = cache_path.with_suffix(".compact.npy")
    compact = np.lib.format.open_memmap(compact_path, mode="w+", dtype=cache.dtype, shape=(len(keep), *cache.shape[1:]))
    for start in range(0, len(keep), 1024):
        compact[start : start + 1024] = cache[keep[start : start + 1024]]
    compact.flush()
    del cache, compact
    compact_path.replace(cache_path)


def write_index(path: Path, captions: list[Caption], raw: RawDataset, image_dir: Path) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(INDEX_COLUMNS)
        for caption in captions:
            file_name = raw.id_to_file[caption.image_id]
            writer.writerow((caption.image_id, file_name, resolve_image(image_dir, file_name).as_posix(), caption.text.strip()))


def write_dropped(path: Path, dropped: list[DroppedImage]) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(("split", "image_id", "path", "reason", "captions_dropped"))
        writer.writerows((d.split, d.image_id, d.path, d.reason, d.captions) for d in dropped)


def caption_stats(captions: list[Caption], tokenizer: PreTrainedTokenizerBase | None = None) -> dict:
    """Counts and length statistics of a split's captions; with `tokenizer`, also `pieces_per_caption`.

    `pieces_per_caption.counts` maps a length in word pieces (`[CLS]` and `[SEP]` included) to
    its number of captions: the captions `model.text.max_len` L truncates are those counted at
    lengths above L, for any L, so the prepared data does not depend on `max_len`.
    """
    lengths = np.array([len(c.text.split()) for c in captions])
    per_image = Counter(c.image_id for c in captions)
    words = Counter(word for c in captions for word in c.text.lower().split())
    stats = {
        "images": len(per_image),
        "captions": len(captions),
        "captions_per_image": {"min": min(per_image.values()), "max": max(per_image.values())},
        "words_per_caption": _summary(lengths),
        "vocabulary": len(words),
    }
    if tokenizer is not None:
        pieces = piece_lengths([c.text for c in captions], tokenizer)
        counts = Counter(pieces.tolist())
        stats["pieces_per_caption"] = _summary(pieces) | {"counts": {str(length): counts[length] for length in sorted(counts)}}
    return stats


def _summary(lengths: np.ndarray) -> dict:
    return {
        "mean": round(float(lengths.mean()), 3),
        "min": int(lengths.min()),
        "median": float(np.median(lengths)),
        "p95": float(np.percentile(lengths, 95)),
        "max": int(lengths.max()),
    }


def recorded_piece_counts(prepared: Path, split: str) -> dict[int, int] | None:
    """`{length in word pieces: captions}` of a prepared split, as `caption_stats` recorded it; None when not recorded."""
    stats_path = prepared / "stats.json"
    if not stats_path.exists():
        return None
    recorded = json.loads(stats_path.read_text()).get(split, {}).get("pieces_per_caption")
    return None if recorded is None else {int(length): n for length, n in recorded["counts"].items()}


def caption_length_report(split: PreparedSplit, prepared: Path, config: Config, tokenizer: PreTrainedTokenizerBase, positions: int) -> str:
    """One log line: how many of `split`'s captions `model.text.max_len` truncates, and the longest, in word pieces.

    The lengths are prepare's record (stats.json) when prepare trained the tokenizer in use,
    else counted now. With `max_len: 0` (no truncation), a caption longer than the text
    backbone's `positions` raises DataError naming its line in `{split}.csv`.
    """
    counts = recorded_piece_counts(prepared, split.name) if config.model.text.init == "random" else None
    if counts is None:
        counts = Counter(piece_lengths(split.captions, tokenizer).tolist())
    max_len, longest = config.model.text.max_len, max(counts)
    if max_len == 0 and longest > positions:
        lengths = piece_lengths(split.captions, tokenizer)
        row = int(np.flatnonzero(lengths > positions)[0])
        raise DataError(
            f"{prepared / f'{split.name}.csv'} line {row + 2}: a caption of {lengths[row]} word pieces is longer than "
            f"{config.model.text.name}'s {positions} positions, and model.text.max_len: 0 does not truncate; "
            f"set model.text.max_len to at most {positions}"
        )
    if max_len == 0:
        return f"{split.name}: model.text.max_len is 0, so no caption is truncated (longest {longest} word pieces)"
    cut = sum(n for length, n in counts.items() if length > max_len)
    return (f"{split.name}: {cut} of {sum(counts.values())} captions are longer than model.text.max_len {max_len} "
            f"word pieces (longest {longest})" + ("; they are truncated" if cut else ""))


def format_problems(problems: list[Problem], root: str) -> str:
    if len(problems) == 1:
        return f"{problems[0]}; nothing was written"
    lines = [f"{root}: {len(problems)} problems in the input data; nothing was written"]
    lines += [f"  {p}" for p in problems[:MAX_LISTED_PROBLEMS]]
    if len(problems) > MAX_LISTED_PROBLEMS:
        lines.append(f"  ... and {len(problems) - MAX_LISTED_PROBLEMS} more")
    return "\n".join(lines)
