"""Evaluation: exact scores from saved embeddings, R@K by protocol, per-query results, plots.

Embeddings are saved by the embed stage under `embeddings/<split>/`:
    images.pt    {"embeddings": [n_images, Di], "image_ids": [n_images]}
    captions.pt  {"embeddings": [n_captions, Dt], "caption_image": [n_captions]}
    meta.json    block_dim, matching, dustbin, sinkhorn_iters, model and split information
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from avse.data.dataset import PreparedSplit
from avse.errors import DataError
from avse.evaluation import eccv
from avse.evaluation.recall import coco_5fold_1k, recall_at_k_curve, recall_metrics, recall_ranks
from avse.model.similarity import block_similarity
from avse.checkpoint import load_checkpoint

PROTOCOLS = {"synthetic": ("1k",), "f30k": ("1k",), "coco": ("5fold1k", "5k")}
TOP_K = 5


@dataclass
class Embeddings:
    images: Tensor  # [n_images, Di]
    image_ids: Tensor  # [n_images]
    captions: Tensor  # [n_captions, Dt]
    caption_image: Tensor  # [n_captions] position of each caption's image
    meta: dict

    @classmethod
    def load(cls, folder: Path) -> "Embeddings":
        meta_path = folder / "meta.json"
        if not meta_path.exists():
            raise DataError(f"{folder}: no embeddings (run the embed stage)")
        images = load_checkpoint(folder / "images.pt")
        captions = load_checkpoint(folder / "captions.pt")
        return cls(images["embeddings"], images["image_ids"], captions["embeddings"], captions["caption_image"], json.loads(meta_path.read_text()))


def score(embeddings: Embeddings, chunk_size: int, device: torch.device = torch.device("cpu")) -> Tensor:
    """Exact `[n_images, n_captions]` similarities with the model's matching."""
    meta = embeddings.meta
    img, cap = embeddings.images.to(device), embeddings.captions.to(device)
    dustbin = torch.tensor(meta["dustbin"], device=device)
    with torch.no_grad():
        return block_similarity(img, cap, meta["block_dim"], meta["matching"], chunk_size, dustbin, meta["sinkhorn_iters"]).cpu()


def check_layout(embeddings: Embeddings, captions_per_image: int = 5) -> None:
    """The recall contract: caption j belongs to image j // captions_per_image."""
    expected = torch.arange(embeddings.captions.size(0)) // captions_per_image
    if embeddings.captions.size(0) != captions_per_image * embeddings.images.size(0) or not torch.equal(embeddings.caption_image, expected):
        raise DataError(f"embeddings: captions are not {captions_per_image} per image in image order; re-run prepare and embed")


def protocol_metrics(sims: Tensor, protocol: str) -> dict[str, float]:
    """`1k`/`5k`: the whole matrix; `5fold1k`: COCO's 5 folds of 1000 images, averaged."""
    if protocol == "5fold1k":
        return coco_5fold_1k(sims)
    return recall_metrics(sims)


def resolve_protocols(protocol: str, dataset: str) -> tuple[str, ...]:
    return PROTOCOLS[dataset] if protocol == "auto" else (protocol,)


def write_recall_curve(sims: Tensor, csv_path: Path, png_path: Path, title: str) -> list[dict[str, float]]:
    """R@K for K = 1..10 in both directions: the DVC plot data and a rendered PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = recall_at_k_curve(*recall_ranks(sims), max_k=10)
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["k", "i2t_recall", "t2i_recall"])
        writer.writeheader()
        writer.writerows({k: round(v, 4) for k, v in row.items()} for row in rows)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ks = [row["k"] for row in rows]
    ax.plot(ks, [row["i2t_recall"] for row in rows], marker="o", label="image to text")
    ax.plot(ks, [row["t2i_recall"] for row in rows], marker="s", label="text to image")
    ax.set(xlabel="K", ylabel="R@K (%)", title=title, xticks=ks, ylim=(0, 100))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=120, format="png")  # the path may be a temporary, whose name says no format
    plt.close(fig)
    return rows


def write_per_query(sims: Tensor, captions: list[str], image_ids: Tensor, image_paths: list[str], out_dir: Path) -> None:
    """`t2i.csv` (one row per caption) and `i2t.csv` (one row per image): rank, ground truth, top-5 with scores."""
    out_dir.mkdir(parents=True, exist_ok=True)
    i2t_ranks, t2i_ranks = recall_ranks(sims)
    n_images, n_captions = sims.shape
    cpi = n_captions // n_images
    k_images, k_captions = min(TOP_K, n_images), min(TOP_K, n_captions)
    t2i_scores, t2i_top = sims.topk(k_images, dim=0)  # [k, n_captions]
    i2t_scores, i2t_top = sims.topk(k_captions, dim=1)  # [n_images, k]
    with (out_dir / "t2i.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["caption_index", "caption", "image_id", "image_path", "rank"]
                        + [f"top{k + 1}_{c}" for k in range(k_images) for c in ("image_id", "score")])
        for j, caption in enumerate(captions):
            gt = j // cpi
            tops = [v for k in range(k_images) for v in (int(image_ids[t2i_top[k, j]]), round(float(t2i_scores[k, j]), 5))]
            writer.writerow([j, caption, int(image_ids[gt]), image_paths[gt], int(t2i_ranks[j])] + tops)
    with (out_dir / "i2t.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image_index", "image_id", "image_path", "rank"]
                        + [f"top{k + 1}_{c}" for k in range(k_captions) for c in ("caption_index", "caption", "score")])
        for i in range(n_images):
            tops = [v for k in range(k_captions) for v in (int(i2t_top[i, k]), captions[i2t_top[i, k]], round(float(i2t_scores[i, k]), 5))]
            writer.writerow([i, int(image_ids[i]), image_paths[i], int(i2t_ranks[i])] + tops)


def coco_test_alignment(split: PreparedSplit, pm_gt_dir: str) -> tuple[eccv.CocoTestAnnotations, eccv.Alignment]:
    """The ground truths of COCO's 5K test and the COCO ids of `split`'s captions and images, or a `DataError`
    naming the first caption that does not follow their order."""
    annotations = eccv.CocoTestAnnotations(Path(pm_gt_dir) if pm_gt_dir else None)
    image_ids = np.asarray(eccv.coco_image_ids(split.image_ids, split.image_paths), dtype=np.int64)
    caption_ids = annotations.align(image_ids[split.caption_image].tolist())
    return annotations, eccv.Alignment(caption_ids, image_ids)


def format_table(results: dict[str, dict[str, float]]) -> str:
    """A fixed-width table of R@K, rsum and ranks, one row per R@K protocol."""
    columns = ["i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum", "i2t_medr", "t2i_medr"]
    header = f"{'protocol':<9}" + "".join(f"{c:>9}" for c in columns)
    lines = [header, "-" * len(header)]
    for protocol, metrics in results.items():
        if "rsum" in metrics:
            lines.append(f"{protocol:<9}" + "".join(f"{metrics[c]:>9.1f}" for c in columns))
    return "\n".join(lines)


def format_coco_test_table(results: dict[str, dict[str, float]]) -> str:
    """ECCV Caption, CxC and PMRP (or a note on how to get it), and the verified share of the misses, both directions."""
    rows = [("ECCV Caption", "eccv", ("map_at_r", "rprecision", "r1")), ("CxC", "cxc", ("r1", "r5", "r10")),
            ("PMRP", "pmrp", ("pmrp",)), ("misses verified", "verified_misses", ("",))]
    lines = [f"{'':<16}{'metric':>11}{'i2t':>9}{'t2i':>9}", "-" * 45]
    for label, protocol, names in rows:
        if protocol not in results:
            lines.append(f"{label:<16}not computed: set eval.pm_gt_dir to the folder of eccv-caption's pm_*.json files")
            continue
        for name in names:
            values = [results[protocol][f"{direction}_{name}" if name else direction] for direction in ("i2t", "t2i")]
            lines.append(f"{label:<16}{name or 'share %':>11}" + "".join(f"{v:>9.1f}" for v in values))
    return "\n".join(lines)
