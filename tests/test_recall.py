import math
import statistics

import numpy as np
import pytest
import torch

from avse.evaluation import recall
from avse.evaluation.recall import coco_5fold_1k, metrics_from_ranks, recall_at_k_curve, recall_metrics, recall_ranks


def reference_metrics(sims: list[list[float]], captions_per_image: int) -> dict[str, float]:
    """The metric definitions, word for word, with plain loops."""
    n_images, n_captions = len(sims), len(sims[0])
    i2t = []
    for i in range(n_images):
        best_own = max(sims[i][i * captions_per_image : (i + 1) * captions_per_image])
        i2t.append(sum(1 for j in range(n_captions) if j // captions_per_image != i and sims[i][j] >= best_own))
    t2i = []
    for j in range(n_captions):
        own_image = j // captions_per_image
        t2i.append(sum(1 for i in range(n_images) if i != own_image and sims[i][j] >= sims[own_image][j]))
    metrics = {}
    for name, ranks in (("i2t", i2t), ("t2i", t2i)):
        for k in (1, 5, 10):
            metrics[f"{name}_r{k}"] = 100.0 * sum(r < k for r in ranks) / len(ranks)
    metrics["rsum"] = sum(metrics[f"{name}_r{k}"] for name in ("i2t", "t2i") for k in (1, 5, 10))
    for name, ranks in (("i2t", i2t), ("t2i", t2i)):
        metrics[f"{name}_medr"] = math.floor(statistics.median(ranks)) + 1
        metrics[f"{name}_meanr"] = statistics.mean(ranks) + 1
    return metrics


def argsort_ranks(sims: np.ndarray, captions_per_image: int) -> tuple[np.ndarray, np.ndarray]:
    """Ranks by sorting each row and column, as the VSE++ evaluation does."""
    n_images = sims.shape[0]
    i2t = np.zeros(n_images, dtype=np.int64)
    for i in range(n_images):
        order = np.argsort(sims[i])[::-1]
        own = range(captions_per_image * i, captions_per_image * (i + 1))
        i2t[i] = min(np.where(order == j)[0][0] for j in own)
    t2i = np.zeros(sims.shape[1], dtype=np.int64)
    for j in range(sims.shape[1]):
        order = np.argsort(sims[:, j])[::-1]
        t2i[j] = np.where(order == j // captions_per_image)[0][0]
    return i2t, t2i


def assert_metrics_equal(actual: dict[str, float], expected: dict[str, float]) -> None:
    assert actual.keys() == expected.keys()
    for key in expected:
        assert actual[key] == pytest.approx(expected[key], abs=1e-9), key


@pytest.mark.parametrize("captions_per_image", [1, 3, 5])
def test_matches_reference_on_untied_scores(captions_per_image):
    torch.manual_seed(0)
    sims = torch.randn(20, 20 * captions_per_image)
    sims += 1.5 * torch.eye(20).repeat_interleave(captions_per_image, dim=1)  # a spread of ranks, not all large
    assert_metrics_equal(recall_metrics(sims, captions_per_image), reference_metrics(sims.tolist(), captions_per_image))
    i2t, t2i = recall_ranks(sims, captions_per_image)
    expected_i2t, expected_t2i = argsort_ranks(sims.numpy(), captions_per_image)
    assert i2t.tolist() == expected_i2t.tolist() and t2i.tolist() == expected_t2i.tolist()


@pytest.mark.parametrize("captions_per_image", [1, 5])
def test_matches_reference_with_ties(captions_per_image):
    torch.manual_seed(1)
    sims = torch.randint(0, 4, (16, 16 * captions_per_image)).float()
    assert_metrics_equal(recall_metrics(sims, captions_per_image), reference_metrics(sims.tolist(), captions_per_image))


def test_counting_in_row_blocks(monkeypatch):
    torch.manual_seed(2)
    sims = torch.randint(0, 6, (13, 65)).double()
    expected = recall_ranks(sims)
    monkeypatch.setattr(recall, "_COUNT_BLOCK_ELEMENTS", 100)  # 1 row per block, then a short last block
    for actual, wanted in zip(recall_ranks(sims), expected):
        assert torch.equal(actual, wanted)


def test_numpy_input():
    rng = np.random.default_rng(3)
    sims = rng.standard_normal((8, 40))
    assert_metrics_equal(recall_metrics(sims), reference_metrics(sims.tolist(), 5))


def test_hand_computed_two_images():
    sims = torch.tensor(
        [
            # captions 0-4 belong to image 0, captions 5-9 to image 1
            [0.9, 0.1, 0.2, 0.3, 0.4, 0.5, 0.95, 0.0, 0.3, 0.0],
            [0.7, 0.0, 0.0, 0.0, 0.0, 0.7, 0.1, 0.2, 0.3, 0.5],
        ]
    )
    i2t, t2i = recall_ranks(sims, 5)
    # Image 0: best own 0.9, beaten by caption 6 (0.95). Image 1: best own 0.7, tied by caption 0.
    assert i2t.tolist() == [1, 1]
    # Caption 6 scores higher with image 0; caption 8 ties (0.3) and the tie counts against it.
    assert t2i.tolist() == [0, 0, 0, 0, 0, 0, 1, 0, 1, 0]
    assert recall_metrics(sims) == pytest.approx(
        {
            "i2t_r1": 0.0,
            "i2t_r5": 100.0,
            "i2t_r10": 100.0,
            "t2i_r1": 80.0,
            "t2i_r5": 100.0,
            "t2i_r10": 100.0,
            "rsum": 480.0,
            "i2t_medr": 2.0,
            "i2t_meanr": 2.0,
            "t2i_medr": 1.0,
            "t2i_meanr": 1.2,
        }
    )


def test_median_of_even_count_is_mean_of_middle_ranks():
    metrics = metrics_from_ranks(torch.tensor([0, 3]), torch.tensor([4, 0, 9]))
    assert metrics["i2t_medr"] == 2.0  # floor(1.5) + 1; the lower middle rank would give 1
    assert metrics["i2t_meanr"] == 2.5
    assert metrics["t2i_medr"] == 5.0
    assert metrics["t2i_meanr"] == pytest.approx(13 / 3 + 1)


def test_recall_at_k_curve():
    i2t, t2i = torch.tensor([0, 2, 4, 12]), torch.tensor([0, 0, 1, 9, 10])
    rows = recall_at_k_curve(i2t, t2i, max_k=10)
    assert [row["k"] for row in rows] == list(range(1, 11))
    assert [row["i2t_recall"] for row in rows] == [25.0, 25.0, 50.0, 50.0, 75.0, 75.0, 75.0, 75.0, 75.0, 75.0]
    assert [row["t2i_recall"] for row in rows] == [40.0, 60.0, 60.0, 60.0, 60.0, 60.0, 60.0, 60.0, 60.0, 80.0]
    metrics = metrics_from_ranks(i2t, t2i)
    for k in (1, 5, 10):
        assert rows[k - 1]["i2t_recall"] == metrics[f"i2t_r{k}"]
        assert rows[k - 1]["t2i_recall"] == metrics[f"t2i_r{k}"]


def test_five_folds_use_their_own_blocks_only():
    torch.manual_seed(4)
    fold_size, captions_per_image, perfect_fold = 12, 5, 2
    n_images = 5 * fold_size
    sims = torch.full((n_images, n_images * captions_per_image), 10.0)  # across folds: must be ignored
    for f in range(5):
        block = torch.rand(fold_size, fold_size * captions_per_image) * 0.5
        own = torch.eye(fold_size).repeat_interleave(captions_per_image, dim=1).bool()
        # Own pairs score above everything in the perfect fold and below everything elsewhere.
        block[own] = 1.0 if f == perfect_fold else -1.0
        rows = slice(f * fold_size, (f + 1) * fold_size)
        cols = slice(f * fold_size * captions_per_image, (f + 1) * fold_size * captions_per_image)
        sims[rows, cols] = block

    metrics = coco_5fold_1k(sims, captions_per_image, fold_size)
    for key in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10"):
        assert metrics[key] == pytest.approx(20.0)  # 100 in the perfect fold, 0 in the four others
    assert metrics["rsum"] == pytest.approx(120.0)
    # Bad folds: 11 other images, so i2t rank 11 * 5 = 55 and t2i rank 11 for every query.
    assert metrics["i2t_medr"] == pytest.approx((1 + 4 * 56) / 5)
    assert metrics["t2i_meanr"] == pytest.approx((1 + 4 * 12) / 5)


def test_default_fold_is_1000_images_of_5_captions():
    torch.manual_seed(5)
    sims = torch.randn(2000, 10000)
    first, second = recall_metrics(sims[:1000, :5000]), recall_metrics(sims[1000:, 5000:])
    assert_metrics_equal(coco_5fold_1k(sims), {key: (first[key] + second[key]) / 2 for key in first})


def test_wrong_shapes_raise():
    with pytest.raises(ValueError, match=r"got shape \(2, 9\)"):
        recall_metrics(torch.zeros(2, 9))
    with pytest.raises(ValueError, match=r"got shape \(10,\)"):
        recall_ranks(torch.zeros(10))
    with pytest.raises(ValueError, match=r"\[n, n \* 2\], got shape \(3, 15\)"):
        recall_metrics(torch.zeros(3, 15), captions_per_image=2)
    with pytest.raises(ValueError, match="do not split into folds of 4"):
        coco_5fold_1k(torch.zeros(10, 50), fold_size=4)


def test_nan_scores_rank_last_not_first():
    sims = torch.eye(3).repeat_interleave(5, dim=1)
    sims[1] = float("nan")  # a diverged model must not look perfect
    metrics = recall_metrics(sims)
    assert metrics["i2t_r1"] == pytest.approx(200 / 3) and metrics["rsum"] < 600
    assert recall_metrics(torch.full((20, 100), float("nan")))["rsum"] == 0.0  # every rank the worst
