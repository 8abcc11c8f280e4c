"""Training losses: VSE++ hinge triplet, InfoNCE, and decorrelation between views.

The retrieval losses take a score matrix of queries (rows) against keys
(columns). ``positive[q]`` is the column of query ``q``'s matching key, and
groups (image ids) mark keys that also match the query (other captions of the
same image): those are never used as negatives. Keys may outnumber queries
(local queries against a gathered global batch), so ``positive`` can be offset.
"""

import torch
import torch.nn.functional as F
from torch import Tensor


def _negative_mask(positive: Tensor, query_groups: Tensor, key_groups: Tensor, num_keys: int) -> Tensor:
    """``[Q, K]`` bool, True where key ``k`` is a negative of query ``q`` (other group, not the positive)."""
    negative = query_groups.unsqueeze(1) != key_groups.unsqueeze(0)  # [Q, K]
    # Also exclude the positive itself, in case its group was given inconsistently.
    is_positive = torch.arange(num_keys, device=positive.device) == positive.unsqueeze(1)  # [Q, K]
    return negative & ~is_positive


def hinge_triplet_loss(
    scores: Tensor,
    positive: Tensor,
    query_groups: Tensor,
    key_groups: Tensor,
    margin: float = 0.2,
    *,
    hardest: bool,
) -> Tensor:
    """VSE++ hinge loss of queries against keys.

    Cost of query ``q`` and negative ``n``: ``relu(margin + s[q, n] - s[q, positive[q]])``.

    Args:
        scores: ``[Q, K]`` similarities.
        positive: ``[Q]`` long, column of each query's positive key.
        query_groups: ``[Q]`` group (image id) of each query.
        key_groups: ``[K]`` group of each key.
        hardest: max over negatives (VSE++ hardest negative) instead of their sum.

    Returns:
        Scalar, summed over queries; a query without negatives contributes 0.
    """
    pos_scores = scores.gather(1, positive.unsqueeze(1))  # [Q, 1]
    cost = (margin + scores - pos_scores).clamp(min=0)  # [Q, K]
    cost = cost.masked_fill(~_negative_mask(positive, query_groups, key_groups, scores.size(1)), 0.0)
    per_query = cost.max(dim=1).values if hardest else cost.sum(dim=1)  # [Q]
    return per_query.sum()


def infonce_loss(
    scores: Tensor,
    positive: Tensor,
    query_groups: Tensor,
    key_groups: Tensor,
    logit_scale: Tensor,
) -> Tensor:
    """Cross entropy of ``logit_scale.exp() * scores`` with target ``positive``.

    Keys of the query's group other than the positive are removed from the softmax
    (they match too, so they must not be pushed away). The caller owns
    ``logit_scale`` (a learnable log-temperature, clamped at ``log(100)`` as in CLIP)
    and symmetrises over both directions.

    Args:
        scores: ``[Q, K]`` similarities.
        positive: ``[Q]`` long, column of each query's positive key.
        query_groups: ``[Q]``; key_groups: ``[K]``.
        logit_scale: scalar tensor.

    Returns:
        Scalar, mean over queries.
    """
    num_keys = scores.size(1)
    is_positive = torch.arange(num_keys, device=scores.device) == positive.unsqueeze(1)  # [Q, K]
    same_group = query_groups.unsqueeze(1) == key_groups.unsqueeze(0)  # [Q, K]
    logits = (logit_scale.exp() * scores).masked_fill(same_group & ~is_positive, float("-inf"))  # [Q, K]
    return F.cross_entropy(logits, positive)


def multi_view_decorrelation(views: Tensor, eps: float = 1e-5) -> Tensor:
    """Barlow-Twins-style decorrelation averaged over all pairs of views.

    Each view's embedding dimensions are standardised over the batch (biased
    variance, ``eps`` as in BatchNorm); for a pair ``(a, b)`` the cross-correlation
    ``C = a_n^T b_n / B`` is ``[D, D]`` and the loss is ``||C - I||_F^2 / D``. It is 0
    exactly when ``C`` is the identity (up to ``eps``): matching dimensions perfectly
    correlated, different ones uncorrelated. Dividing by ``B`` once (not twice) is
    what makes the identity reachable, so the term actually constrains the views.

    Args:
        views: ``[B, V, D]`` embeddings of ``V`` views of the same ``B`` images, ``B >= 2``.

    Returns:
        Scalar float32, mean over the ``V * (V - 1) / 2`` pairs; 0 for ``V = 1``.
    """
    _, num_views, dim = views.shape
    if num_views < 2:
        return views.new_zeros((), dtype=torch.float32)
    # float32: batch statistics and D x D sums are too coarse in half precision.
    x = views.float()
    corr = _view_pair_correlations((x - x.mean(dim=0)) / torch.sqrt(x.var(dim=0, unbiased=False) + eps))  # [pairs, D, D]
    eye = torch.eye(dim, device=views.device)
    return ((corr - eye) ** 2).sum(dim=(1, 2)).mean() / dim


def _view_pair_correlations(normalised: Tensor) -> Tensor:
    """``C = a^T b / B`` of every pair of views ``(a, b)`` of ``normalised`` ``[B, V, D]``: ``[V (V - 1) / 2, D, D]``."""
    num_views = normalised.size(1)
    first, second = torch.triu_indices(num_views, num_views, offset=1, device=normalised.device)  # [pairs] each
    return torch.einsum("bpd,bpe->pde", normalised[:, first], normalised[:, second]) / normalised.size(0)


def official_decorrelation(views: Tensor, eps: float = 1e-8, off_diagonal_weight: float = 0.0051) -> Tensor:
    """The official AVSE code's view decorrelation (``forward_loss`` in its ``lib/vse.py``).

    Each view's embedding ``[B, D]`` has every dimension (column) divided by its L2 norm
    over the batch plus ``eps`` (its ``l2norm(x, 0)``; no centring); for a pair
    ``(a, b)``, ``C = a_n^T b_n / B`` and the loss is ``sum_i (C_ii - 1)^2 +
    0.0051 * sum_{i != j} C_ij^2``. The official code has exactly 2 views; with more,
    this is the mean over the ``V * (V - 1) / 2`` pairs (as :func:`multi_view_decorrelation`).
    The official code adds it to the retrieval loss with weight 1; here
    ``train.decorrelation_weight`` multiplies it, so ``1`` reproduces the paper.

    Floor: the columns are unit vectors, so ``|C_ij| <= 1 / B`` (Cauchy-Schwarz): dividing
    by ``B`` after normalising puts the identity out of reach, and the diagonal term is at
    least ``D * (1 - 1 / B)^2`` (1008.06 at ``B = 128``, ``D = 1024``), reached when each
    dimension's column is the same in both views. At random initialisation it is already
    near that floor (1008.8 for a random model at ``B = 128``, ``D = 1024``: its embeddings
    hardly vary over the batch, so the views' columns align; 1024.0 for independent
    random columns). It mostly rewards aligning the views' columns, not decorrelating
    dimensions: each off-diagonal term is at most ``0.0051 / B^2``.

    Args:
        views: ``[B, V, D]`` embeddings of ``V`` views of the same ``B`` images.

    Returns:
        Scalar float32; 0 for ``V = 1``.
    """
    _, num_views, dim = views.shape
    if num_views < 2:
        return views.new_zeros((), dtype=torch.float32)
    x = views.float()
    corr = _view_pair_correlations(x / (x.norm(dim=0, keepdim=True) + eps))  # [pairs, D, D]; unit columns over the batch
    diagonal = corr.diagonal(dim1=1, dim2=2)  # [pairs, D]
    on = ((diagonal - 1) ** 2).sum(dim=1)  # [pairs]
    off = corr.masked_fill(torch.eye(dim, dtype=torch.bool, device=views.device), 0.0).square().sum(dim=(1, 2))  # [pairs]
    return (on + off_diagonal_weight * off).mean()
