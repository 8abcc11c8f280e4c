"""Radial bias sampling: split an image's patch tokens into several partial views.

Patch tokens form a ``grid_h x grid_w`` grid (row-major when flattened). Each view
keeps the ``k`` patches around a view centre. Training has two modes
(``model.view_sampling``):

- ``gumbel``: the centre is uniform over the continuous grid and patches are drawn
  without replacement with probability proportional to ``w = exp(-alpha * d)``
  (near patches likely, far ones possible);
- ``nearest`` (the released official code): the centre is a uniformly drawn patch
  and the ``k`` nearest patches are kept (its ``multinomial`` draw is commented out
  in favour of ``topk``).

At evaluation time the centres are fixed and the ``k`` nearest patches are kept, so
an image always gets the same views.

Coordinates are ``(row, col)`` in patch units: patch ``(r, c)`` covers
``[r, r + 1) x [c, c + 1)`` and its centre is ``(r + 0.5, c + 0.5)``.
"""

import math
from typing import Literal

import torch
from torch import Tensor

# Eval view centres lie on an ellipse around the grid centre whose semi-axes are
# this fraction of the grid's height and width (a circle on square grids).
EVAL_RADIUS_FRACTION = 0.25


def _draw_device(generator: torch.Generator | None, device: torch.device | str | None) -> torch.device | str | None:
    """Where to draw: on the generator's own device, so a CPU generator also works for GPU tensors."""
    return generator.device if generator is not None else device


def _uniform(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device | str | None) -> Tensor:
    """Uniform [0, 1) draws on ``device``."""
    return torch.rand(shape, generator=generator, device=_draw_device(generator, device)).to(device)


def keep_count(keep_ratio: float, grid_h: int, grid_w: int, rule: Literal["patches", "tokens"] = "patches", num_prefix: int = 1) -> int:
    """Number of patches one view keeps, ``1 <= k <= P`` with ``P = grid_h * grid_w``.

    ``patches``: ``round(keep_ratio * P)``, the ratio is a share of the patches.
    ``tokens`` (the official code): ``int((num_prefix + P) * keep_ratio)``, a share of the
    whole token sequence, class token(s) included, truncated. At 224 px, patch 16
    (196 patches + 1 class token) and ratios 0.8 / 0.9: ``patches`` keeps 157 / 176,
    ``tokens`` 157 / 177.
    """
    if not 0.0 < keep_ratio <= 1.0:
        raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio}")
    num_patches = grid_h * grid_w
    if rule == "patches":
        keep = round(keep_ratio * num_patches)
    elif rule == "tokens":
        keep = int((num_prefix + num_patches) * keep_ratio)  # the official `int(n * 0.8)`, same float product
    else:
        raise ValueError(f"keep count rule must be patches or tokens, got {rule!r}")
    return min(num_patches, max(1, keep))


def view_centres(
    batch: int,
    views: int,
    grid_h: int,
    grid_w: int,
    *,
    train: bool,
    at_patches: bool = False,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Centres of each image's views, ``(row, col)`` in patch units.

    Training: independent uniform draws over the grid ``[0, grid_h) x [0, grid_w)``; with
    ``at_patches`` the centre ``(r + 0.5, c + 0.5)`` of a uniformly drawn patch instead
    (the official code's ``torch.randint`` over the patches; its integer coordinates
    ``(r, c)`` are this grid's shifted by half a patch, which changes no distance).
    Evaluation: depends only on ``(views, grid_h, grid_w)``: one view is centred on
    the grid; ``V > 1`` views are evenly spaced on an ellipse with semi-axes
    ``grid_h / 4`` and ``grid_w / 4`` around the grid centre, the first at the top,
    going clockwise. Every image of the batch gets the same centres.

    Returns:
        ``[B, V, 2]`` float32 centres.
    """
    # Constants enter as Python numbers: a tensor built from them on a GPU is a copy the host waits for.
    if train and at_patches:
        index = torch.randint(grid_h * grid_w, (batch, views), generator=generator, device=_draw_device(generator, device)).to(device)
        return torch.stack([index // grid_w, index % grid_w], dim=-1).float() + 0.5  # [B, V, 2]
    if train:
        draws = _uniform((batch, views, 2), generator, device)
        return torch.stack([draws[..., 0] * grid_h, draws[..., 1] * grid_w], dim=-1)  # [B, V, 2]
    angle = torch.arange(views, dtype=torch.float32, device=device) * (2 * math.pi / views)  # [V]
    radius = EVAL_RADIUS_FRACTION if views > 1 else 0.0  # one view sits on the centre
    # Row grows downwards, so minus cos puts view 0 above the centre.
    rows = grid_h / 2 - torch.cos(angle) * (grid_h * radius)  # [V]
    cols = grid_w / 2 + torch.sin(angle) * (grid_w * radius)  # [V]
    centres = torch.stack([rows, cols], dim=-1)  # [V, 2]
    return centres.expand(batch, views, 2).contiguous()  # [B, V, 2]


def radial_bias_indices(
    centres: Tensor,
    grid_h: int,
    grid_w: int,
    keep: int,
    alpha: float = 4.0,
    *,
    noise: bool,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Indices of the patches each view keeps.

    Distances ``d`` from patch centres to the view centre are divided by
    ``max(grid_h, grid_w)`` so ``alpha`` means the same at any resolution. With
    ``noise`` the keep-set is the top-``keep`` of ``log w + Gumbel`` with
    ``log w = -alpha * d``, i.e. ``keep`` draws without replacement with
    probability proportional to ``w``; without it, exactly the ``keep`` nearest
    patches (``alpha`` then has no effect), equally distant ones in index order.
    Squared distances from a centre on a patch centre (or corner) are exact, so
    equally distant patches tie exactly and the lower indices are kept: the same
    views on every device. (The official ``topk`` leaves the order of ties
    unspecified, so at the boundary ring it may keep other patches of equal distance;
    at 24 x 24 patches its ``exp(-4 d)`` also underflows to 0 beyond ``d ~ 26``, so near
    a corner it keeps arbitrary far patches. The nearest ones are always among its answers.)

    Args:
        centres: ``[B, V, 2]`` view centres from :func:`view_centres`.
        keep: patches kept per view, ``1 <= keep <= grid_h * grid_w``.

    Returns:
        ``[B, V, keep]`` long indices into the row-major flattened grid, sorted
        ascending so the kept tokens stay in spatial order.
    """
    num_patches = grid_h * grid_w
    if not 1 <= keep <= num_patches:
        raise ValueError(f"keep must be in [1, {num_patches}], got {keep}")
    device = centres.device
    rows = torch.arange(grid_h, dtype=torch.float32, device=device) + 0.5
    cols = torch.arange(grid_w, dtype=torch.float32, device=device) + 0.5
    patch_centres = torch.stack(torch.meshgrid(rows, cols, indexing="ij"), dim=-1).reshape(num_patches, 2)  # [P, 2]
    offsets = patch_centres - centres.float().unsqueeze(-2)  # [B, V, P, 2]
    if not noise:
        nearest = offsets.square().sum(dim=-1).argsort(dim=-1, stable=True)[..., :keep]  # [B, V, k]
        return nearest.sort(dim=-1).values
    dist = offsets.norm(dim=-1) / max(grid_h, grid_w)  # [B, V, P]
    # Clamp keeps log(log(.)) finite at the ends of [0, 1).
    tiny = torch.finfo(torch.float32).tiny
    u = _uniform(tuple(dist.shape), generator, device).clamp_(tiny, 1.0 - torch.finfo(torch.float32).eps)
    scores = -alpha * dist - torch.log(-torch.log(u))  # log w + Gumbel(0, 1), [B, V, P]
    return scores.topk(keep, dim=-1).indices.sort(dim=-1).values  # [B, V, k]


def gather_views(tokens: Tensor, indices: Tensor, num_prefix: int) -> Tensor:
    """Build the token sequence of every view.

    Args:
        tokens: ``[B, num_prefix + P, D]``; the prefix (class token(s)) comes first.
        indices: ``[B, V, k]`` patch indices from :func:`radial_bias_indices`.
        num_prefix: number of leading tokens copied into every view.

    Returns:
        ``[B * V, num_prefix + k, D]``; the ``V`` views of one image are consecutive
        (row ``b * V + v`` is view ``v`` of image ``b``).
    """
    batch, views, keep = indices.shape
    dim = tokens.size(-1)
    prefix = tokens[:, :num_prefix].unsqueeze(1).expand(batch, views, num_prefix, dim)  # [B, V, n, D]
    flat = indices.reshape(batch, views * keep, 1).expand(batch, views * keep, dim)  # [B, V*k, D]
    patches = tokens[:, num_prefix:].gather(1, flat).reshape(batch, views, keep, dim)  # [B, V, k, D]
    return torch.cat([prefix, patches], dim=2).reshape(batch * views, num_prefix + keep, dim)
