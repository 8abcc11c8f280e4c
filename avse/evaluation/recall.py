"""Retrieval metrics of an image-caption score matrix (VSE++ / VSE-infinity protocol).

Caption ``j`` belongs to image ``j // captions_per_image``. Ranks start at 0 and are
computed by counting, which is exact and puts ties against the query:

- the i2t rank of an image is the number of other images' captions scoring at least
  as high as its best own caption;
- the t2i rank of a caption is the number of other images scoring at least as high
  as its own image.

On untied scores these are the positions found by sorting each row or column, as the
reference evaluation does, but counting is a few element-wise passes over the matrix.
"""

import numpy as np
import torch
from torch import Tensor

RECALL_KS = (1, 5, 10)

# Comparisons are counted over blocks of rows holding about this many scores: the
# boolean intermediate stays small whatever the matrix size, and in cache (blocks of
# 2**24 scores were 5x slower on CPU, mostly in allocating and faulting them in).
_COUNT_BLOCK_ELEMENTS = 1 << 20


def _as_score_matrix(sims: Tensor | np.ndarray, captions_per_image: int) -> Tensor:
    """``sims`` as a ``[n_images, n_images * captions_per_image]`` tensor (no copy for tensors)."""
    sims = torch.as_tensor(sims)
    if captions_per_image < 1:
        raise ValueError(f"captions_per_image must be at least 1, got {captions_per_image}")
    if sims.dim() != 2 or sims.size(1) != sims.size(0) * captions_per_image:
        raise ValueError(
            f"sims must be [n_images, n_images * captions_per_image] = "
            f"[n, n * {captions_per_image}], got shape {tuple(sims.shape)}"
        )
    if sims.is_floating_point() and bool(torch.isnan(sims).any()):
        # NaN compares false with everything, which would rank it first: score it last instead.
        sims = sims.nan_to_num(nan=float("-inf"))
    return sims


def recall_ranks(sims: Tensor | np.ndarray, captions_per_image: int = 5) -> tuple[Tensor, Tensor]:
    """Rank of every image query (i2t) and of every caption query (t2i).

    Args:
        sims: ``[n_images, n_captions]`` scores, ``n_captions = n_images * captions_per_image``;
            a tensor on any device or a numpy array.
        captions_per_image: captions of each image, stored consecutively.

    Returns:
        ``(i2t_ranks [n_images], t2i_ranks [n_captions])``, int64, on the device of ``sims``.

    Raises:
        ValueError: ``sims`` does not have the shape above.
    """
    sims = _as_score_matrix(sims, captions_per_image)
    n_images, n_captions = sims.shape
    device = sims.device
    image_ids = torch.arange(n_images, device=device)  # [n_images]
    own_columns = image_ids[:, None] * captions_per_image + torch.arange(captions_per_image, device=device)  # [n_images, cpi]
    own_scores = sims[image_ids[:, None], own_columns]  # [n_images, cpi]
    best_own = own_scores.amax(dim=1)  # [n_images]
    caption_image = torch.arange(n_captions, device=device) // captions_per_image  # [n_captions]
    caption_own = sims[caption_image, torch.arange(n_captions, device=device)]  # [n_captions]

    i2t_at_least = torch.empty(n_images, dtype=torch.int64, device=device)  # captions >= best own, own included
    t2i_at_least = torch.zeros(n_captions, dtype=torch.int64, device=device)  # images >= own image, own included
    rows_per_block = max(1, _COUNT_BLOCK_ELEMENTS // n_captions)
    for start in range(0, n_images, rows_per_block):
        block = sims[start : start + rows_per_block]  # [r, n_captions]
        i2t_at_least[start : start + rows_per_block] = (block >= best_own[start : start + rows_per_block, None]).sum(dim=1)
        t2i_at_least += (block >= caption_own).sum(dim=0)

    # Own captions at or above the best own one (at least that one) are not competitors.
    i2t_ranks = i2t_at_least - (own_scores >= best_own[:, None]).sum(dim=1)  # [n_images]
    t2i_ranks = t2i_at_least - 1  # [n_captions], the own image always counts once
    return i2t_ranks, t2i_ranks


def _median_rank(ranks: Tensor) -> float:
    """``floor(median) + 1`` with the median of an even count the mean of the two middle ranks."""
    ordered = ranks.sort().values
    n = ordered.numel()
    median = ordered[n // 2].double() if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]).double() / 2
    return float(median.floor()) + 1.0


def metrics_from_ranks(i2t_ranks: Tensor, t2i_ranks: Tensor) -> dict[str, float]:
    """Recall@{1,5,10} (percent), their sum, median and mean rank (1-based) per direction.

    Args:
        i2t_ranks: ``[n_images]`` 0-based ranks of the image queries.
        t2i_ranks: ``[n_captions]`` 0-based ranks of the caption queries.

    Returns:
        ``i2t_r1 i2t_r5 i2t_r10 t2i_r1 t2i_r5 t2i_r10 rsum i2t_medr i2t_meanr t2i_medr t2i_meanr``.
    """
    metrics: dict[str, float] = {}
    for direction, ranks in (("i2t", i2t_ranks), ("t2i", t2i_ranks)):
        for k in RECALL_KS:
            metrics[f"{direction}_r{k}"] = 100.0 * float((ranks < k).double().mean())
    metrics["rsum"] = sum(metrics[f"{direction}_r{k}"] for direction in ("i2t", "t2i") for k in RECALL_KS)
    for direction, ranks in (("i2t", i2t_ranks), ("t2i", t2i_ranks)):
        metrics[f"{direction}_medr"] = _median_rank(ranks)
        metrics[f"{direction}_meanr"] = float(ranks.double().mean()) + 1.0
    return metrics


def recall_metrics(sims: Tensor | np.ndarray, captions_per_image: int = 5) -> dict[str, float]:
    """Retrieval metrics of a ``[n_images, n_images * captions_per_image]`` score matrix.

    See :func:`recall_ranks` for the ranks and :func:`metrics_from_ranks` for the keys.

    Raises:
        ValueError: ``sims`` does not have that shape.
    """
    return metrics_from_ranks(*recall_ranks(sims, captions_per_image))


def recall_at_k_curve(i2t_ranks: Tensor, t2i_ranks: Tensor, max_k: int = 10) -> list[dict[str, float]]:
    """Recall@K (percent) in both directions for ``K = 1 .. max_k``, one row per ``K``.

    Returns:
        ``[{"k": K, "i2t_recall": ..., "t2i_recall": ...}, ...]``, ``max_k`` rows.
    """
    if max_k < 1:
        raise ValueError(f"max_k must be at least 1, got {max_k}")

    def recall_per_k(ranks: Tensor) -> list[float]:
        # Queries with rank r count for every K > r: a histogram of ranks, accumulated.
        hits = torch.bincount(ranks.clamp(max=max_k), minlength=max_k + 1)[:max_k].cumsum(0)  # [max_k]
        return (100.0 * hits.double() / ranks.numel()).tolist()

    i2t, t2i = recall_per_k(i2t_ranks), recall_per_k(t2i_ranks)
    return [{"k": k, "i2t_recall": i2t[k - 1], "t2i_recall": t2i[k - 1]} for k in range(1, max_k + 1)]


def coco_5fold_1k(
    sims: Tensor | np.ndarray, captions_per_image: int = 5, fold_size: int = 1000
) -> dict[str, float]:
    """COCO 1K protocol: metrics of each block of ``fold_size`` images, averaged over the blocks.

    Fold ``f`` is images ``f * fold_size .. (f + 1) * fold_size - 1`` against their own
    captions ``f * fold_size * captions_per_image .. (f + 1) * fold_size * captions_per_image - 1``;
    on COCO 5K this gives the usual 5 folds of 1000 images and 5000 captions.

    Raises:
        ValueError: ``sims`` has the wrong shape, or its images do not split into whole folds.
    """
    sims = _as_score_matrix(sims, captions_per_image)
    n_images = sims.size(0)
    if fold_size < 1 or n_images % fold_size != 0:
        raise ValueError(f"{n_images} images do not split into folds of {fold_size}")
    fold_captions = fold_size * captions_per_image
    folds = [
        recall_metrics(sims[f * fold_size : (f + 1) * fold_size, f * fold_captions : (f + 1) * fold_captions], captions_per_image)
        for f in range(n_images // fold_size)
    ]
    return {key: sum(fold[key] for fold in folds) / len(folds) for key in folds[0]}
