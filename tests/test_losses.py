"""Tests for avse.model.losses: hand-computed hinge values, InfoNCE masking, view decorrelation."""

import math

import pytest
import torch
import torch.nn.functional as F

from avse.model.losses import (
    hinge_triplet_loss,
    infonce_loss,
    multi_view_decorrelation,
    official_decorrelation,
)


def view_decorrelation_loss(a, b):
    """The regulariser between two views `[B, D]`."""
    return multi_view_decorrelation(torch.stack([a, b], dim=1))


def t(rows: list) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def ids(values: list[int]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long)


# margin 0.2, positives on the diagonal, all groups distinct:
# row 0: pos 0.9; negs 0.5 -> relu(0.2+0.5-0.9)=0,   0.8 -> 0.1       sum 0.1, max 0.1
# row 1: pos 0.7; negs 0.3 -> 0,                     0.6 -> 0.1       sum 0.1, max 0.1
# row 2: pos 0.2; negs 0.4 -> relu(0.2+0.4-0.2)=0.4, 0.1 -> 0.1       sum 0.5, max 0.4
# total: sum 0.7, hardest 0.6
SCORES_3X3 = [[0.9, 0.5, 0.8], [0.3, 0.7, 0.6], [0.4, 0.1, 0.2]]


@pytest.mark.parametrize(("hardest", "expected"), [(False, 0.7), (True, 0.6)])
def test_hinge_hand_computed_3x3(hardest: bool, expected: float) -> None:
    loss = hinge_triplet_loss(t(SCORES_3X3), ids([0, 1, 2]), ids([0, 1, 2]), ids([0, 1, 2]), 0.2, hardest=hardest)
    assert loss.item() == pytest.approx(expected, abs=1e-12)


def test_hinge_transposed_scores_for_t2i() -> None:
    # Transpose: row 0 = [0.9, 0.3, 0.4] -> 0, 0;  row 1 = [0.5, 0.7, 0.1] -> 0, 0;
    # row 2 = [0.8, 0.6, 0.2] -> relu(0.2+0.8-0.2)=0.8, 0.6  -> sum 1.4, max 0.8
    scores = t(SCORES_3X3).T
    assert hinge_triplet_loss(scores, ids([0, 1, 2]), ids([0, 1, 2]), ids([0, 1, 2]), hardest=False).item() == pytest.approx(1.4)
    assert hinge_triplet_loss(scores, ids([0, 1, 2]), ids([0, 1, 2]), ids([0, 1, 2]), hardest=True).item() == pytest.approx(0.8)


# Queries 0 and 1 are two captions of image 7; keys 0 and 1 likewise.
# row 0: pos 0.5; key 1 same group (would cost 0.2+0.6-0.5=0.3); key 2: relu(0.2+0.1-0.5)=0   -> 0
# row 1: pos 0.5; key 0 same group (would cost 0.3);             key 2: relu(0.2+0.2-0.5)=0   -> 0
# row 2: pos 0.9; key 0: relu(0.2+0.0-0.9)=0; key 1: relu(0.2+0.8-0.9)=0.1                     -> 0.1
# with groups: 0.1 in both modes; treating the captions as negatives would give 0.7.
SCORES_GROUPS = [[0.5, 0.6, 0.1], [0.6, 0.5, 0.2], [0.0, 0.8, 0.9]]


@pytest.mark.parametrize("hardest", [False, True])
def test_hinge_same_group_keys_are_not_negatives(hardest: bool) -> None:
    scores = t(SCORES_GROUPS)
    groups = ids([7, 7, 9])
    loss = hinge_triplet_loss(scores, ids([0, 1, 2]), groups, groups, hardest=hardest)
    assert loss.item() == pytest.approx(0.1)
    distinct = hinge_triplet_loss(scores, ids([0, 1, 2]), ids([0, 1, 2]), ids([0, 1, 2]), hardest=hardest)
    assert distinct.item() == pytest.approx(0.7)


# Rank 1 of 2: local queries are global items 2 and 3, keys are the 4 global items.
# row 0: pos s[0,2]=0.6; keys 0: relu(0.2+0.1-0.6)=0, 1: relu(0.2+0.5-0.6)=0.1, 3: relu(0.2+0.3-0.6)=0
#        -> sum 0.1, max 0.1
# row 1: pos s[1,3]=0.8; keys 0: relu(0.2+0.75-0.8)=0.15, 1: 0, 2: relu(0.2+0.7-0.8)=0.1
#        -> sum 0.25, max 0.15
# total: sum 0.35, hardest 0.25
SCORES_2X4 = [[0.1, 0.5, 0.6, 0.3], [0.75, 0.2, 0.7, 0.8]]


@pytest.mark.parametrize(("hardest", "expected"), [(False, 0.35), (True, 0.25)])
def test_hinge_more_keys_than_queries_with_offset_positives(hardest: bool, expected: float) -> None:
    loss = hinge_triplet_loss(t(SCORES_2X4), ids([2, 3]), ids([2, 3]), ids([0, 1, 2, 3]), hardest=hardest)
    assert loss.item() == pytest.approx(expected)


def test_hinge_gradients_finite_and_on_violators_only() -> None:
    scores = t(SCORES_3X3).requires_grad_()
    hinge_triplet_loss(scores, ids([0, 1, 2]), ids([0, 1, 2]), ids([0, 1, 2]), hardest=True).backward()
    assert torch.isfinite(scores.grad).all()
    # Hardest violators: (0,2), (1,2), (2,0); each pushes its negative up and its positive down.
    expected = t([[-1, 0, 1], [0, -1, 1], [1, 0, -1]])
    assert torch.equal(scores.grad, expected)


def test_infonce_matches_cross_entropy_when_groups_distinct() -> None:
    scores = torch.randn(4, 6, generator=torch.Generator().manual_seed(0))
    positive = ids([1, 0, 3, 5])
    logit_scale = torch.tensor(math.log(20.0))
    loss = infonce_loss(scores, positive, ids([10, 11, 12, 13]), ids([20, 21, 22, 23, 24, 25]), logit_scale)
    assert loss.item() == pytest.approx(F.cross_entropy(20.0 * scores, positive).item(), rel=1e-6)


def test_infonce_masks_same_group_non_positive_keys() -> None:
    # scale 10. Row 0 (group 0, positive key 0): key 1 shares group 0 and is removed,
    #   logits [5, -, 1] -> log(1 + e^-4).
    # Row 1 (group 1, positive key 2): nothing masked, logits [2, 3, 8] -> log(1 + e^-6 + e^-5).
    scores = t([[0.5, 0.9, 0.1], [0.2, 0.3, 0.8]])
    logit_scale = torch.tensor(math.log(10.0), dtype=torch.float64, requires_grad=True)
    loss = infonce_loss(scores, ids([0, 2]), ids([0, 1]), ids([0, 0, 1]), logit_scale)
    expected = (math.log(1 + math.exp(-4)) + math.log(1 + math.exp(-6) + math.exp(-5))) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    unmasked = F.cross_entropy(10.0 * scores, ids([0, 2]))
    assert unmasked.item() > loss.item() + 1.0  # key 1 (logit 9) would dominate row 0
    loss.backward()
    assert torch.isfinite(logit_scale.grad)


def whitened_orthogonal(batch: int, dim: int, seed: int) -> torch.Tensor:
    """[batch, dim] with zero-mean, unit (biased) variance, mutually orthogonal columns."""
    x = torch.randn(batch, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    q, _ = torch.linalg.qr(x - x.mean(dim=0))  # columns stay zero-mean: they span centred vectors
    return q * math.sqrt(batch)


def test_decorrelation_zero_at_identity_correlation() -> None:
    a = whitened_orthogonal(32, 8, seed=0)
    # Positive per-dimension scales and shifts leave the standardised views, hence C = I, unchanged.
    b = a * torch.linspace(0.5, 3.0, 8, dtype=torch.float64) + 1.0
    assert view_decorrelation_loss(a, b).item() == pytest.approx(0.0, abs=1e-6)
    assert view_decorrelation_loss(a, a).item() == pytest.approx(0.0, abs=1e-6)


def test_decorrelation_positive_otherwise() -> None:
    a = whitened_orthogonal(32, 8, seed=0)
    # Swapped dimensions: C is a permutation, two ones off the diagonal and two zeros on it -> 4 / 8.
    swapped = a[:, [1, 0, 2, 3, 4, 5, 6, 7]]
    assert view_decorrelation_loss(a, swapped).item() == pytest.approx(0.5, abs=1e-4)
    noisy = torch.randn(32, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert view_decorrelation_loss(a, noisy).item() > 0.1


def test_multi_view_averages_pairs_and_single_view_is_zero() -> None:
    views = torch.randn(16, 3, 5, generator=torch.Generator().manual_seed(2))
    pairs = [view_decorrelation_loss(views[:, i], views[:, j]) for i, j in [(0, 1), (0, 2), (1, 2)]]
    assert multi_view_decorrelation(views).item() == pytest.approx(torch.stack(pairs).mean().item(), rel=1e-5)
    assert multi_view_decorrelation(views[:, :1]).item() == 0.0


def test_decorrelation_gradients_finite() -> None:
    views = torch.randn(8, 4, 6, generator=torch.Generator().manual_seed(3), requires_grad=True)
    multi_view_decorrelation(views).backward()
    assert torch.isfinite(views.grad).all()
    assert views.grad.abs().sum() > 0


def official_term_by_loops(a: list[list[float]], b: list[list[float]], eps: float = 1e-8) -> float:
    """The official formula on two views `[B][D]` in plain Python: columns over the batch
    scaled to unit norm (+ eps), C = a_n^T b_n / B, sum (C_ii - 1)^2 + 0.0051 sum_{i != j} C_ij^2."""
    batch, dim = len(a), len(a[0])

    def unit_columns(x):
        norms = [math.sqrt(sum(x[n][d] ** 2 for n in range(batch))) + eps for d in range(dim)]
        return [[x[n][d] / norms[d] for d in range(dim)] for n in range(batch)]

    a, b = unit_columns(a), unit_columns(b)
    total = 0.0
    for i in range(dim):
        for j in range(dim):
            c = sum(a[n][i] * b[n][j] for n in range(batch)) / batch
            total += (c - 1) ** 2 if i == j else 0.0051 * c ** 2
    return total


def test_official_decorrelation_hand_computed() -> None:
    # Unit columns: a -> (0.6, 0.8), (0, 1); b -> (0, 1), (1, 0). C = [[0.8, 0.6], [1, 0]] / 2
    # = [[0.4, 0.3], [0.5, 0]]: (0.4 - 1)^2 + (0 - 1)^2 + 0.0051 * (0.3^2 + 0.5^2) = 1.361734.
    views = t([[[3.0, 0.0], [0.0, 2.0]], [[4.0, 1.0], [5.0, 0.0]]])  # [B=2, V=2, D=2]
    assert official_decorrelation(views).item() == pytest.approx(1.361734, abs=1e-6)


def test_official_decorrelation_matches_plain_loops_and_averages_pairs() -> None:
    views = torch.randn(6, 3, 4, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    rows = views.tolist()  # [B][V][D]
    pairs = [official_term_by_loops([r[i] for r in rows], [r[j] for r in rows]) for i, j in [(0, 1), (0, 2), (1, 2)]]
    assert official_decorrelation(views[:, :2]).item() == pytest.approx(pairs[0], rel=1e-6)
    assert official_decorrelation(views).item() == pytest.approx(sum(pairs) / 3, rel=1e-6)
    assert official_decorrelation(views[:, :1]).item() == 0.0


def test_official_decorrelation_cannot_go_below_d_times_one_minus_one_over_b_squared() -> None:
    batch, dim = 16, 8
    floor = dim * (1 - 1 / batch) ** 2
    # Identical views with orthogonal columns reach the floor: C = I / B.
    a = whitened_orthogonal(batch, dim, seed=5)
    assert official_decorrelation(torch.stack([a, a], dim=1)).item() == pytest.approx(floor, rel=1e-6)
    for seed in range(5):
        views = torch.randn(batch, 2, dim, generator=torch.Generator().manual_seed(seed))
        assert official_decorrelation(views).item() >= floor


@pytest.mark.parametrize("formula", ["standardised", "official"])
def test_the_objective_adds_the_configured_decorrelation_times_its_weight(formula: str) -> None:
    from avse.config import from_dict
    from avse.model.avse import build_model
    from avse.training.distributed import DistContext
    from avse.training.objective import contrastive_loss

    ctx = DistContext(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    gen = torch.Generator().manual_seed(6)
    img = F.normalize(torch.randn(8, 2, 256, generator=gen), dim=-1).view(8, 512)
    cap, groups = torch.randn(8, 256, generator=gen), torch.arange(8)

    def loss(weight: float) -> float:
        config = from_dict({"train": {"decorrelation": formula, "decorrelation_weight": weight}})
        return contrastive_loss(build_model(config, vocab_size=100), img, cap, groups, ctx, config, epoch=0).item()

    term = (official_decorrelation if formula == "official" else multi_view_decorrelation)(img.view(8, 2, 256)).item()
    assert loss(2.0) - loss(0.0) == pytest.approx(2.0 * term, rel=1e-5)
