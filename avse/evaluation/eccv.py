"""COCO's 5K test as the field now reports it: ECCV Caption and CxC beside R@K, through the `eccv-caption` package.

COCO counts a caption of another image that truly describes an image as a miss. Two re-annotations of the
Karpathy 5K test split measure retrieval without that error:

- ECCV Caption (Chun et al., "ECCV Caption: Correcting False Negatives by Collecting Machine-and-Human-verified
  Image-Caption Associations for MS-COCO", ECCV 2022): verified positives for 1,261 image and 1,332 caption
  queries; mAP@R, R-Precision and R@1.
- CxC (Parekh et al., "Crisscrossed Captions: Extended Intramodal and Intermodal Semantic Similarity Judgments
  for MS-COCO", EACL 2021): human similarity ratings; R@1, R@5 and R@10.
- PMRP (plausible-match R-Precision, from the same package) when its extra ground-truth files are given
  (`eval.pm_gt_dir`).

The package names captions by COCO caption id and images by COCO image id. Its caption ids come in the order of
the Karpathy 5K test split (the `testall_caps.txt` of VSE-infinity, LAPS and the official AVSE code), five per
image: a split is scored only if its captions' images are exactly that order (`align`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from avse.errors import ConfigError, DataError

# COCO's own file names carry the image id; a split converted from Karpathy's JSON numbers its images by position.
COCO_FILE_NAME = re.compile(r"COCO_(?:val|train)2014_(\d{12})\.jpg$")
PM_FILES = ("pm_image_to_caption.json", "pm_caption_to_image.json")
KS = (1, 5, 10)
# Ranked lists are found for this many queries at a time: masks over a whole 5,000 x 25,000 matrix would hold gigabytes.
_CHUNK = 256


def coco_image_ids(image_ids: list[int] | np.ndarray, image_paths: list[str]) -> list[int]:
    """The COCO image id of each image: from its file name where it is COCO's own (`COCO_val2014_<id>.jpg`), else the
    split's id (the caption-split layout numbers images by their COCO id)."""
    result = []
    for image_id, path in zip(image_ids, image_paths):
        match = COCO_FILE_NAME.search(str(path))
        result.append(int(match.group(1)) if match else int(image_id))
    return result


@dataclass(frozen=True)
class Alignment:
    caption_ids: np.ndarray  # [n_captions] COCO caption id of each caption of the split, in split order
    image_ids: np.ndarray  # [n_images] COCO image id of each image of the split, in split order


class CocoTestAnnotations:
    """The ground truths `eccv-caption` ships: COCO's own pairs, ECCV Caption's and CxC's, and PMRP's if given."""

    def __init__(self, pm_gt_dir: Path | None = None):
        try:
            import eccv_caption
        except ImportError:
            raise ConfigError("ECCV Caption and CxC metrics need the package eccv-caption (pip install eccv-caption)") from None
        if pm_gt_dir is not None:
            missing = [name for name in PM_FILES if not (Path(pm_gt_dir) / name).is_file()]
            if missing:
                raise ConfigError(f"eval.pm_gt_dir: {pm_gt_dir} has no {' or '.join(missing)} (the package's extra PMRP ground truth)")
        self.metrics = eccv_caption.Metrics(str(pm_gt_dir) if pm_gt_dir else None)
        self.caption_order = np.asarray(self.metrics.coco_ids, dtype=np.int64)  # [25000] Karpathy 5K test order

    def align(self, caption_images: list[int]) -> np.ndarray:
        """The COCO caption id of each caption, given the COCO image id of each caption's image in split order.

        Raises `DataError` naming the first caption whose image is not the one the Karpathy order has there: a
        subset, a reordering or another split would score its captions against the wrong ground truth.
        """
        expected_images = [self.metrics.coco_gts["t2i"][int(caption)][0] for caption in self.caption_order]
        if len(caption_images) != len(expected_images):
            raise DataError(f"ECCV Caption and CxC score COCO's whole 5K test split ({len(expected_images)} captions, 5 per image "
                            f"in the Karpathy order); this split has {len(caption_images)} captions")
        for line, (image, expected) in enumerate(zip(caption_images, expected_images), start=1):
            if image != expected:
                raise DataError(f"caption {line} (line {line} of testall_caps.txt and testall_ids.txt) is of COCO image {image}, where "
                                f"the Karpathy 5K test order that ECCV Caption and CxC follow has image {expected}: a reordered or "
                                "another split cannot be scored against their ground truth")
        return self.caption_order.copy()

    def ground_truths(self) -> dict[str, dict[str, dict[int, list[int]]]]:
        """`{"coco" | "eccv" | "cxc" [| "pm"]: {"i2t": {image id: caption ids}, "t2i": {caption id: image ids}}}`."""
        truths = {"coco": self.metrics.coco_gts, "eccv": self.metrics.eccv_gts, "cxc": self.metrics.cxc_gts}
        return truths | ({"pm": self.metrics.pm_gts} if self.metrics.pm_gts else {})

    def scores(self, i2t: dict[int, list[int]], t2i: dict[int, list[int]]) -> dict[str, dict[str, float]]:
        """ECCV Caption's mAP@R, R-Precision and R@1, CxC's R@K and (with its files) PMRP, in percent, by the package."""
        retrieved = {"i2t": i2t, "t2i": t2i}
        # The package draws a progress bar over ECCV's queries whatever its `verbose`: the stage shows its own.
        with mock.patch("eccv_caption._metrics.tqdm", lambda items, **_: items):
            eccv = self.metrics.eccv_metrics(retrieved, "all")
            cxc = {k: self.metrics.cxc_recalls(retrieved, "all", K=k) for k in KS}
            pm = self.metrics.pmrp(retrieved, "all") if self.metrics.pm_gts else None
        results = {
            "eccv": {f"{direction}_{name.removeprefix('eccv_')}": 100 * float(value)
                     for name, by_direction in eccv.items() for direction, value in by_direction.items()},
            "cxc": {f"{direction}_r{k}": 100 * float(cxc[k][direction]) for direction in ("i2t", "t2i") for k in KS},
        }
        if pm is not None:
            results["pmrp"] = {f"{direction}_pmrp": 100 * float(pm[direction]) for direction in ("i2t", "t2i")}
        return {protocol: dict(sorted(metrics.items())) for protocol, metrics in results.items()}

    def list_lengths(self) -> tuple[int, int]:
        """How long each query's ranked list must be for every metric: (captions per image query, images per caption query)."""
        truths = self.ground_truths().values()
        return (max(KS[-1], *(len(v) for gt in truths for v in gt["i2t"].values())),
                max(KS[-1], *(len(v) for gt in truths for v in gt["t2i"].values())))


def ranked_lists(sims: Tensor, length: int) -> Tensor:
    """The `length` best columns of each row of `sims` `[n_rows, n_cols]`, best first, equal scores in column order
    (at the cut too), so the lists are the same on every machine. NaN scores last. Returns `[n_rows, length]` int64.

    A top-k, not a sort of whole rows: a tenth of the time at COCO's 5K test.
    """
    lists = []
    for chunk in sims.split(_CHUNK):
        chunk = chunk.nan_to_num(nan=float("-inf"))  # [c, n_cols]
        cut = chunk.topk(length, dim=1).values[:, -1:]  # [c, 1] the length-th best score of each row
        above, tied = chunk > cut, chunk == cut
        room = length - above.sum(dim=1, keepdim=True)  # how many tied columns the list takes: the first ones
        kept = (above | (tied & (tied.cumsum(dim=1) <= room))).nonzero()[:, 1].view(-1, length)  # [c, length] ascending
        order = chunk.gather(1, kept).sort(dim=1, descending=True, stable=True).indices
        lists.append(kept.gather(1, order))
    return torch.cat(lists)


def retrieved_items(sims: Tensor, alignment: Alignment, i2t_length: int, t2i_length: int) -> tuple[dict[int, list[int]], dict[int, list[int]]]:
    """The package's input: `{image id: caption ids best first}` and `{caption id: image ids best first}` from the exact
    scores `sims` `[n_images, n_captions]` of the aligned split."""
    captions, images = alignment.caption_ids, alignment.image_ids
    i2t_top = ranked_lists(sims, i2t_length).numpy()  # [n_images, i2t_length]
    t2i_top = ranked_lists(sims.T.contiguous(), t2i_length).numpy()  # [n_captions, t2i_length]; rows are faster to scan
    i2t = {int(image): captions[top].tolist() for image, top in zip(images, i2t_top)}
    t2i = {int(caption): images[top].tolist() for caption, top in zip(captions, t2i_top)}
    return i2t, t2i


def coco_test_metrics(sims: Tensor, alignment: Alignment, annotations: CocoTestAnnotations) -> dict[str, dict[str, float]]:
    """ECCV Caption, CxC (and PMRP) metrics of the exact scores `sims` `[n_images, n_captions]`, in percent, and the
    share of misses whose top item they verify (`verified_misses`, per direction)."""
    i2t, t2i = retrieved_items(sims, alignment, *annotations.list_lengths())
    return annotations.scores(i2t, t2i) | {"verified_misses": verified_shares(verified_misses(i2t, t2i, annotations))}


def verified_shares(misses: pd.DataFrame) -> dict[str, float]:
    """Per direction, the percentage of the misses of :func:`verified_misses` whose top item a re-annotation verified."""
    return {direction: 100 * float((group["verified_by"] != "").mean()) if len(group) else 0.0
            for direction, group in ((d, misses[misses["direction"] == d]) for d in ("i2t", "t2i"))}


def verified_misses(i2t: dict[int, list[int]], t2i: dict[int, list[int]], annotations: CocoTestAnnotations) -> pd.DataFrame:
    """Every miss (the top-ranked item is not a COCO positive) of a query that ECCV Caption or CxC covers, and which of them
    verified its top item as a positive: the annotation's error, not the model's.

    Columns: `direction` (i2t | t2i), `query` and `top` (COCO ids: image and caption for i2t, caption and image for t2i),
    `verified_by` ("ECCV Caption", "CxC", "ECCV Caption, CxC", or "" for a true miss).
    """
    truths = annotations.ground_truths()
    rows = []
    for direction, retrieved in (("i2t", i2t), ("t2i", t2i)):
        covered = truths["eccv"][direction].keys() | truths["cxc"][direction].keys()
        for query in sorted(covered):
            top = retrieved[query][0]
            if top in truths["coco"][direction][query]:
                continue
            by = [label for label, name in (("ECCV Caption", "eccv"), ("CxC", "cxc")) if top in truths[name][direction].get(query, ())]
            rows.append({"direction": direction, "query": query, "top": top, "verified_by": ", ".join(by)})
    return pd.DataFrame(rows, columns=["direction", "query", "top", "verified_by"])
