"""Tests for avse.model.sampling: view centres, radial bias keep-sets, and view gathering."""

import pytest
import torch

from avse.model.sampling import gather_views, keep_count, radial_bias_indices, view_centres

GRIDS = [(14, 14), (24, 24), (12, 20)]


def patch_distances(centres: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
    """Brute-force [B, V, P] distances from every patch centre to every view centre."""
    rows = [r + 0.5 for r in range(grid_h) for _ in range(grid_w)]
    cols = [c + 0.5 for _ in range(grid_h) for c in range(grid_w)]
    patches = torch.tensor([rows, cols]).T  # [P, 2], row-major
    return torch.cdist(centres.reshape(-1, 2).double(), patches.double()).reshape(*centres.shape[:2], -1)


def test_keep_count() -> None:
    assert keep_count(0.5, 14, 14) == 98
    assert keep_count(0.5, 24, 24) == 288
    assert keep_count(0.001, 14, 14) == 1
    assert keep_count(1.0, 12, 20) == 240
    with pytest.raises(ValueError):
        keep_count(0.0, 14, 14)


@pytest.mark.parametrize(("grid", "num_prefix", "patches", "tokens"), [
    (14, 1, (157, 176), (157, 177)),  # ViT at 224 px, patch 16: 196 patches + the class token
    (24, 1, (461, 518), (461, 519)),  # ViT at 384 px, patch 16
    (8, 1, (51, 58), (52, 58)),  # vit-tiny at 64 px, patch 8
    (7, 0, (39, 44), (39, 44)),  # Swin's final 7 x 7 grid: no class token
])
def test_keep_count_rules_at_train_and_eval_ratios(grid: int, num_prefix: int, patches: tuple, tokens: tuple) -> None:
    assert tuple(keep_count(r, grid, grid, "patches", num_prefix) for r in (0.8, 0.9)) == patches
    assert tuple(keep_count(r, grid, grid, "tokens", num_prefix) for r in (0.8, 0.9)) == tokens
    # The official code's own expression on its embedding sequence [B, num_prefix + P, D].
    sequence = num_prefix + grid * grid
    assert tokens == (int(sequence * 0.8), int(sequence * 0.9))


def test_keep_count_tokens_never_exceeds_the_patches() -> None:
    assert keep_count(1.0, 14, 14, "tokens") == 196
    with pytest.raises(ValueError, match="patches or tokens"):
        keep_count(0.5, 14, 14, "sequence")


@pytest.mark.parametrize(("grid_h", "grid_w"), GRIDS)
@pytest.mark.parametrize("noise", [False, True])
def test_indices_count_unique_in_range_sorted(grid_h: int, grid_w: int, noise: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    keep = keep_count(0.4, grid_h, grid_w)
    centres = view_centres(5, 3, grid_h, grid_w, train=True, generator=gen)
    idx = radial_bias_indices(centres, grid_h, grid_w, keep, 4.0, noise=noise, generator=gen)
    assert idx.shape == (5, 3, keep) and idx.dtype == torch.long
    assert idx.min() >= 0 and idx.max() < grid_h * grid_w
    assert (idx.diff(dim=-1) > 0).all()  # strictly ascending: sorted and unique


@pytest.mark.parametrize(("grid_h", "grid_w"), GRIDS)
def test_without_noise_keeps_exactly_the_nearest(grid_h: int, grid_w: int) -> None:
    centres = view_centres(4, 2, grid_h, grid_w, train=True, generator=torch.Generator().manual_seed(1))
    keep = keep_count(0.3, grid_h, grid_w)
    idx = radial_bias_indices(centres, grid_h, grid_w, keep, 4.0, noise=False)
    dist = patch_distances(centres, grid_h, grid_w)
    expected = dist.argsort(dim=-1)[..., :keep].sort(dim=-1).values  # random centres: no ties
    assert torch.equal(idx, expected)


@pytest.mark.parametrize("views", [1, 2, 4])
def test_eval_keeps_nearest_up_to_ties(views: int) -> None:
    # Fixed centres sit on patch corners, so distance ties are expected: compare distances, not indices.
    centres = view_centres(2, views, 14, 14, train=False)
    idx = radial_bias_indices(centres, 14, 14, 50, 4.0, noise=False)
    dist = patch_distances(centres, 14, 14)
    kept = torch.zeros_like(dist, dtype=torch.bool).scatter_(-1, idx, True)
    assert (dist.masked_fill(~kept, 0).amax(-1) <= dist.masked_fill(kept, float("inf")).amin(-1) + 1e-9).all()


def test_eval_centres_fixed() -> None:
    a = view_centres(3, 4, 14, 14, train=False)
    b = view_centres(3, 4, 14, 14, train=False)
    assert torch.equal(a, b)
    assert torch.equal(a[0], a[1]) and torch.equal(a[0], a[2])
    assert torch.allclose(view_centres(2, 1, 14, 14, train=False), torch.tensor([7.0, 7.0]))
    # 4 views on the circle of radius 14/4 = 3.5: top, right, bottom, left.
    expected = torch.tensor([[3.5, 7.0], [7.0, 10.5], [10.5, 7.0], [7.0, 3.5]])
    assert torch.allclose(a[0], expected, atol=1e-5)
    # Non-square grid: an ellipse with semi-axes h/4 and w/4 stays inside.
    rect = view_centres(1, 6, 12, 20, train=False)[0]
    assert torch.allclose(((rect - torch.tensor([6.0, 10.0])) / torch.tensor([3.0, 5.0])).norm(dim=-1), torch.ones(6))


def test_eval_indices_identical_across_calls_and_images() -> None:
    centres = view_centres(3, 2, 24, 24, train=False)
    a = radial_bias_indices(centres, 24, 24, 100, 4.0, noise=False)
    b = radial_bias_indices(centres, 24, 24, 100, 4.0, noise=False)
    assert torch.equal(a, b) and torch.equal(a[0], a[2])
    assert not torch.equal(a[0, 0], a[0, 1])  # the two views differ


def test_train_centres_seeded() -> None:
    def draw(seed: int) -> torch.Tensor:
        return view_centres(8, 2, 12, 20, train=True, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(draw(0), draw(0))
    assert not torch.equal(draw(0), draw(1))
    centres = draw(2)
    assert (centres >= 0).all() and (centres[..., 0] < 12).all() and (centres[..., 1] < 20).all()


def nearest_by_loops(centre: tuple[float, float], grid_h: int, grid_w: int, keep: int) -> list[int]:
    """The `keep` patches nearest to `centre`, equal distances in index order, in plain Python."""
    by_distance = sorted(((r + 0.5 - centre[0]) ** 2 + (c + 0.5 - centre[1]) ** 2, r * grid_w + c)
                         for r in range(grid_h) for c in range(grid_w))
    return sorted(index for _, index in by_distance[:keep])


def test_nearest_keeps_exact_indices_ties_in_index_order() -> None:
    # 4 x 4 grid, centre on patch (1, 1) = index 5: its 4 neighbours at distance 1, then the
    # 4 diagonal ones (0, 2, 8, 10) at sqrt(2), of which keep 7 takes the lower two.
    centre = torch.tensor([[[1.5, 1.5]]])
    assert radial_bias_indices(centre, 4, 4, 5, noise=False).tolist() == [[[1, 4, 5, 6, 9]]]
    assert radial_bias_indices(centre, 4, 4, 7, noise=False).tolist() == [[[0, 1, 2, 4, 5, 6, 9]]]


@pytest.mark.parametrize(("grid_h", "grid_w"), [(5, 6), (7, 7)])
@pytest.mark.parametrize("keep", [1, 7, 13, 29])
def test_nearest_around_every_patch_matches_a_brute_force_reference(grid_h: int, grid_w: int, keep: int) -> None:
    centres = torch.tensor([[[r + 0.5, c + 0.5] for r in range(grid_h) for c in range(grid_w)]])  # [1, P, 2]
    idx = radial_bias_indices(centres, grid_h, grid_w, keep, 4.0, noise=False)
    expected = [nearest_by_loops(tuple(centre), grid_h, grid_w, keep) for centre in centres[0].tolist()]
    assert idx[0].tolist() == expected


def test_train_centres_at_patches_are_seeded_uniform_patch_centres() -> None:
    def draw(seed: int) -> torch.Tensor:
        return view_centres(3000, 2, 4, 5, train=True, at_patches=True, generator=torch.Generator().manual_seed(seed))

    centres = draw(0)
    assert centres.shape == (3000, 2, 2) and torch.equal(centres, draw(0)) and not torch.equal(centres, draw(1))
    patch = centres - 0.5  # the official code's integer (row, col) of the drawn patch
    assert torch.equal(patch, patch.round()) and (patch >= 0).all()
    assert (patch[..., 0] < 4).all() and (patch[..., 1] < 5).all()
    counts = torch.bincount((patch[..., 0] * 5 + patch[..., 1]).long().flatten(), minlength=20)
    assert counts.min() > 0.7 * 300 and counts.max() < 1.3 * 300  # 6000 draws over 20 patches


def test_noisy_indices_seeded_and_radially_biased() -> None:
    centres = torch.tensor([[[7.0, 7.0]]]).expand(2000, 1, 2)
    keep = keep_count(0.25, 14, 14)

    def draw(seed: int) -> torch.Tensor:
        return radial_bias_indices(centres, 14, 14, keep, 4.0, noise=True, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(draw(0), draw(0))
    assert not torch.equal(draw(0), draw(1))
    freq = torch.zeros(2000, 196).scatter_(1, draw(2)[:, 0], 1.0).mean(0).reshape(14, 14)
    # Near patches are kept more often, but far ones are still possible.
    assert freq[6, 6] > 0.4 and freq[0, 0] < freq[3, 3] < freq[6, 6]
    assert freq[0, 0] > 0
    nearest = radial_bias_indices(centres[:1], 14, 14, keep, 4.0, noise=False)
    assert not all(torch.equal(row, nearest[0, 0]) for row in draw(3)[:20, 0])


def test_gather_views_keeps_prefix_and_selects_patches() -> None:
    batch, views, num_prefix, dim = 3, 2, 1, 4
    grid_h, grid_w = 4, 5
    tokens = torch.randn(batch, num_prefix + grid_h * grid_w, dim, generator=torch.Generator().manual_seed(0))
    centres = view_centres(batch, views, grid_h, grid_w, train=True, generator=torch.Generator().manual_seed(1))
    idx = radial_bias_indices(centres, grid_h, grid_w, 6, 4.0, noise=True, generator=torch.Generator().manual_seed(2))
    out = gather_views(tokens, idx, num_prefix)
    assert out.shape == (batch * views, num_prefix + 6, dim)
    for b in range(batch):
        for v in range(views):
            row = out[b * views + v]
            assert torch.equal(row[:num_prefix], tokens[b, :num_prefix])
            assert torch.equal(row[num_prefix:], tokens[b, num_prefix + idx[b, v]])


def test_gather_views_multiple_prefix_tokens_and_gradients() -> None:
    tokens = torch.randn(2, 2 + 14 * 14, 8, requires_grad=True)
    idx = radial_bias_indices(view_centres(2, 3, 14, 14, train=False), 14, 14, 98, 4.0, noise=False)
    out = gather_views(tokens, idx, num_prefix=2)
    assert out.shape == (6, 100, 8)
    assert torch.equal(out[4, :2], tokens[1, :2])
    out.sum().backward()
    assert torch.all(tokens.grad[:, :2] == 3)  # each prefix token is copied into all 3 views
