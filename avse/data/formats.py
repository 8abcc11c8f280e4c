"""Raw caption formats: the caption-split layout and Karpathy's JSON.

Both are read into the same in-memory form, `RawDataset`: per split, one record per
caption (its text, its image id, where it came from), plus the id -> file mapping.
Reading never raises on content problems: it collects `Problem`s so that validation
can report every one of them in one go.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from avse.errors import DataError

CAPTIONS_PER_IMAGE = 5
SPLITS = {"synthetic": ("train", "dev", "test"), "f30k": ("train", "dev", "test"), "coco": ("train", "dev", "testall")}
EVAL_SPLITS = ("dev", "test", "testall")
KARPATHY_SPLITS = {"train": "train", "restval": "train", "val": "dev", "test": "test"}
KARPATHY_FILES = {"f30k": "dataset_flickr30k.json", "coco": "dataset_coco.json"}
_COCO_SUBSET = re.compile(r"COCO_(train2014|val2014)_")


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the input, located precisely enough to fix it."""

    where: str  # file, or file:line
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


@dataclass(frozen=True)
class Caption:
    text: str
    image_id: int
    where: str  # caps file:line, or the JSON file and image


@dataclass
class RawSplit:
    name: str
    captions: list[Caption] = field(default_factory=list)


@dataclass
class RawDataset:
    splits: dict[str, RawSplit]
    id_to_file: dict[int, str]  # image id -> path relative to the image folder
    mapping_source: str  # where ids are defined, for error messages
    problems: list[Problem] = field(default_factory=list)


def detect_format(root: Path, dataset: str) -> str:
    """`splits` when caption files are present, `karpathy` when only the JSON is."""
    if (root / "id_mapping.json").exists():
        return "splits"
    if dataset in KARPATHY_FILES and (root / KARPATHY_FILES[dataset]).exists():
        return "karpathy"
    expected = "id_mapping.json and {split}_caps.txt / {split}_ids.txt"
    if dataset in KARPATHY_FILES:
        expected += f", or {KARPATHY_FILES[dataset]}"
    raise DataError(f"{root}: no dataset found (expected {expected})")


def read_dataset(root: Path, dataset: str, fmt: str = "auto") -> RawDataset:
    fmt = detect_format(root, dataset) if fmt == "auto" else fmt
    if fmt == "karpathy":
        return read_karpathy(root / KARPATHY_FILES.get(dataset, "dataset.json"), dataset)
    return read_caption_splits(root, SPLITS[dataset])


def read_lines(path: Path, problems: list[Problem]) -> list[str]:
    """Lines of a UTF-8 text file without line endings; CRLF and a leading BOM are accepted.

    A line that is not valid UTF-8 is reported (file and line) and kept as decoded with
    replacement characters, so the remaining checks still see the right line numbers.
    """
    data = path.read_bytes()
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    decoded = []
    for number, raw in enumerate(lines, start=1):
        raw = raw.removesuffix(b"\r")
        try:
            decoded.append(raw.decode("utf-8"))
        except UnicodeDecodeError as err:
            problems.append(Problem(f"{path}:{number}", f"not valid UTF-8 (byte {err.start + 1}: {raw[err.start:err.start + 1]!r})"))
            decoded.append(raw.decode("utf-8", errors="replace"))
    return decoded


def read_id_mapping(path: Path) -> dict[int, str]:
    """`id_mapping.json`: a JSON object from image index (as a string) to file name."""
    def reject_duplicates(pairs):
        seen = {}
        for key, value in pairs:
            if key in seen:
                raise DataError(f"{path}: image id {key} appears twice")
            seen[key] = value
        return seen

    try:
        raw = json.loads(path.read_text(encoding="utf-8-sig"), object_pairs_hook=reject_duplicates)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except OSError as err:  # a folder, say
        raise DataError(f"{path}: cannot be read ({err.strerror})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{path}: not a valid UTF-8 JSON file ({err})") from None
    if not isinstance(raw, dict):
        raise DataError(f"{path}: expected a JSON object mapping image ids to file names")
    mapping: dict[int, str] = {}
    keys: dict[int, str] = {}
    files: dict[str, str] = {}
    for key, name in raw.items():
        if not re.fullmatch(r"\d+", key):
            raise DataError(f"{path}: key {key!r} is not a non-negative integer image id")
        image_id = int(key)
        if image_id in keys:  # "3" and "03": distinct JSON keys, one image id
            raise DataError(f"{path}: image id {image_id} appears twice (keys {keys[image_id]!r} and {key!r})")
        if not isinstance(name, str) or not name:
            raise DataError(f"{path}: image id {key} maps to {name!r}, expected a file name")
        refused = unsafe_image_name(name)
        if refused:
            raise DataError(f"{path}: image id {key} maps to {name!r}, which {refused}")
        if name in files:
            raise DataError(f"{path}: file {name} is mapped by both image id {files[name]} and {key}")
        keys[image_id], files[name] = key, key
        mapping[image_id] = name
    return mapping


def unsafe_image_name(name: str) -> str | None:
    """Why the file name `name`, from a dataset's files, may not be opened in the image folder (`data.images`);
    None when it may. A name from data never reaches files outside that folder."""
    if "\0" in name:
        return "contains a NUL byte"
    if Path(name).is_absolute() or ".." in Path(name).parts:
        return "leads outside the image folder (data.images): names are relative to it, without '..'"
    return None


def read_caption_splits(root: Path, split_names: tuple[str, ...]) -> RawDataset:
    """The layout shipped by the VSE-infinity, LAPS and AVSE repositories.

    `{split}_caps.txt` has one caption per line; `{split}_ids.txt` has either one image
    id per caption or one per image (then each image has CAPTIONS_PER_IMAGE captions).
    """
    mapping_path = root / "id_mapping.json"
    dataset = RawDataset(splits={}, id_to_file=read_id_mapping(mapping_path), mapping_source=str(mapping_path))
    problems = dataset.problems
    for name in split_names:
        caps_path, ids_path = root / f"{name}_caps.txt", root / f"{name}_ids.txt"
        if not caps_path.exists() and not ids_path.exists():
            continue  # e.g. an evaluation-only copy of a dataset has no train split
        unreadable = [p for p in (caps_path, ids_path) if not p.is_file()]
        if unreadable:
            problems.extend(Problem(str(p), "not a regular file" if p.exists() else "file not found") for p in unreadable)
            continue
        captions = read_lines(caps_path, problems)
        id_lines = read_lines(ids_path, problems)
        ids = []
        for number, text in enumerate(id_lines, start=1):
            if re.fullmatch(r"\s*\d+\s*", text):
                ids.append(int(text))
            else:
                problems.append(Problem(f"{ids_path}:{number}", f"{text!r} is not a non-negative integer image id"))
                ids.append(-1)
        per_caption = _ids_per_caption(ids, len(captions))
        if per_caption is None:
            problems.append(Problem(
                str(ids_path),
                f"{len(ids)} lines, but {caps_path.name} has {len(captions)} captions "
                f"(expected {len(captions)} ids, one per caption, or {len(captions) / CAPTIONS_PER_IMAGE:g}, one per image)",
            ))
            continue
        split = dataset.splits[name] = RawSplit(name)
        for number, (text, image_id) in enumerate(zip(captions, per_caption), start=1):
            split.captions.append(Caption(text, image_id, f"{caps_path}:{number}"))
    if not dataset.splits and not problems:
        raise DataError(f"{root}: no caption files found (expected {{split}}_caps.txt and {{split}}_ids.txt for {', '.join(split_names)})")
    return dataset


def _ids_per_caption(ids: list[int], n_captions: int) -> list[int] | None:
    if len(ids) == n_captions:
        return ids
    if len(ids) * CAPTIONS_PER_IMAGE == n_captions:
        return [i for i in ids for _ in range(CAPTIONS_PER_IMAGE)]
    return None


def read_karpathy(path: Path, dataset: str) -> RawDataset:
    """Karpathy's `dataset_*.json`, converted deterministically to the caption-split form.

    Image ids are positions in `images[]`; `restval` joins `train`, `val` becomes
    `dev`, and COCO's `test` becomes `testall`. The first CAPTIONS_PER_IMAGE
    sentences of each image are kept (a few COCO images have six or seven), as the
    caption-split files of the reference repositories do.
    """
    try:
        raw = json.loads(path.read_text(encoding="utf-8-sig"))
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except OSError as err:  # a folder, say
        raise DataError(f"{path}: cannot be read ({err.strerror})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{path}: not a valid UTF-8 JSON file ({err})") from None
    images = raw.get("images") if isinstance(raw, dict) else None
    if not isinstance(images, list):
        raise DataError(f"{path}: expected an object with an 'images' list (Karpathy format)")
    split_names = SPLITS.get(dataset, SPLITS["f30k"])
    result = RawDataset(splits={name: RawSplit(name) for name in split_names}, id_to_file={}, mapping_source=str(path))
    for index, image in enumerate(images):
        where = f"{path}: images[{index}]"
        try:
            filename, split_name = image["filename"], image["split"]
            sentences = [s["raw"] for s in image["sentences"]]
        except (KeyError, TypeError):
            result.problems.append(Problem(where, "expected 'filename', 'split' and 'sentences' with 'raw' texts"))
            continue
        if split_name not in KARPATHY_SPLITS:
            result.problems.append(Problem(where, f"split {split_name!r} is not one of {', '.join(KARPATHY_SPLITS)}"))
            continue
        split = KARPATHY_SPLITS[split_name]
        if split == "test" and dataset == "coco":
            split = "testall"
        name = f"{image['filepath']}/{filename}" if image.get("filepath") else str(filename)
        refused = unsafe_image_name(name)
        if refused:
            result.problems.append(Problem(where, f"file name {name!r} {refused}"))
            continue
        result.id_to_file[index] = name
        for number, text in enumerate(sentences[:CAPTIONS_PER_IMAGE]):
            result.splits[split].captions.append(Caption(text, index, f"{where}.sentences[{number}]"))
    return result


def write_caption_splits(dataset: RawDataset, out_dir: Path) -> None:
    """Write the caption-split layout (used to convert Karpathy JSON into files)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, split in dataset.splits.items():
        (out_dir / f"{name}_caps.txt").write_text("".join(f"{c.text}\n" for c in split.captions), encoding="utf-8")
        (out_dir / f"{name}_ids.txt").write_text("".join(f"{c.image_id}\n" for c in split.captions), encoding="utf-8")
    mapping = {str(i): name for i, name in sorted(dataset.id_to_file.items())}
    (out_dir / "id_mapping.json").write_text(json.dumps(mapping, indent=0) + "\n", encoding="utf-8")


def resolve_image(image_dir: Path, file_name: str) -> Path:
    """Path of an image file; COCO names find their `train2014`/`val2014` subfolder."""
    direct = image_dir / file_name
    if direct.exists():
        return direct
    subset = _COCO_SUBSET.match(Path(file_name).name)
    if subset:
        nested = image_dir / subset.group(1) / Path(file_name).name
        if nested.exists():
            return nested
    return direct
