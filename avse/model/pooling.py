"""GPO, the Generalized Pooling Operator of VSE-infinity (Chen et al., CVPR 2021), and its size augmentation.

GPO learns, for each set size ``n``, weights over the ``n`` ranks of every
feature dimension: pooled = sum_k weights_k * (k-th largest value). One-hot
weights on rank 0 give max-pooling, uniform weights give mean-pooling.
"""

import math

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

# Softmax temperature over rank scores, as in VSE-infinity.
TEMPERATURE = 0.1


def positional_encoding(length: int, dim: int, device: torch.device | str | None = None) -> Tensor:
    """Sinusoidal encoding of positions ``0..length-1`` (sin on even, cos on odd channels).

    Returns:
        ``[length, dim]`` float32.
    """
    position = torch.arange(length, dtype=torch.float32, device=device).unsqueeze(1)  # [L, 1]
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32, device=device) * (-math.log(10000.0) / dim))
    angle = position * freq  # [L, ceil(dim / 2)]
    pe = torch.zeros(length, dim, device=device)
    pe[:, 0::2] = torch.sin(angle)
    pe[:, 1::2] = torch.cos(angle[:, : dim // 2])
    return pe


def valid_mask(lengths: Tensor, max_len: int) -> Tensor:
    """``[B, max_len]`` bool, True at positions ``< lengths[b]``."""
    return torch.arange(max_len, device=lengths.device) < lengths.unsqueeze(1)


def sorted_weighted_sum(features: Tensor, lengths: Tensor | None, weights: Tensor) -> Tensor:
    """Sort each dimension over the valid positions (descending) and weight the ranks.

    Args:
        features: ``[B, L, D]``, positions ``>= lengths[b]`` are padding.
        lengths: ``[B]`` valid counts, ``>= 1``; None when every position is valid.
        weights: ``[B, L]`` rank weights, zero beyond ``lengths[b]``.

    Returns:
        ``[B, D]`` = ``sum_k weights[b, k] * sorted[b, k]``.
    """
    if lengths is None:
        ranked = features.sort(dim=1, descending=True).values  # [B, L, D]
    else:
        mask = valid_mask(lengths, features.size(1)).unsqueeze(-1)  # [B, L, 1]
        # -inf sorts padding after every real value; it is zeroed again before weighting.
        ranked = features.masked_fill(~mask, float("-inf")).sort(dim=1, descending=True).values  # [B, L, D]
        ranked = ranked.masked_fill(~mask, 0.0)
    return (ranked * weights.unsqueeze(-1).to(ranked.dtype)).sum(dim=1)  # [B, D]


class GPO(nn.Module):
    """Generalized Pooling Operator: positional encodings -> BiGRU -> rank scores -> softmax weights.

    The weights depend only on the set size. Sizes are read from the data on the device, never on
    the host (a GPU would wait for the host): the BiGRU scores every size ``1..L`` the padded length
    allows at once, and each sample looks up its row.
    """

    def __init__(self, d_pe: int = 32, d_hidden: int = 32) -> None:
        super().__init__()
        self.d_pe = d_pe
        self.gru = nn.GRU(d_pe, d_hidden, num_layers=1, batch_first=True, bidirectional=True)
        self.linear = nn.Linear(d_hidden, 1, bias=False)

    def _rank_scores(self, max_len: int, device: torch.device, every_size: bool) -> Tensor:
        """Score each rank with the BiGRU.

        Returns:
            ``[1, L]`` scores of a full set, or with ``every_size`` ``[L, L]``: row ``i`` scores
            a set of ``L - i`` elements (arbitrary beyond it).
        """
        pe = positional_encoding(max_len, self.d_pe, device).unsqueeze(0)  # [1, L, d_pe]
        if every_size:
            # Packing keeps the backward direction from starting in the padding; the sizes, decreasing as packing
            # wants them, are known on the host.
            packed = pack_padded_sequence(pe.expand(max_len, -1, -1), list(range(max_len, 0, -1)), batch_first=True)
            out, _ = pad_packed_sequence(self.gru(packed)[0], batch_first=True, total_length=max_len)  # [L, L, 2 * H]
        else:
            out, _ = self.gru(pe)  # [1, L, 2 * H]
        forward, backward = out.chunk(2, dim=-1)
        return self.linear((forward + backward) / 2).squeeze(-1)  # [1, L] or [L, L]

    def pool_weights(self, lengths: Tensor | None, max_len: int) -> Tensor:
        """Softmax weights over the ranks of each sample; they depend only on ``lengths``.

        Args:
            lengths: ``[B]`` valid counts, ``1 <= lengths <= max_len``; None when every set is full.
            max_len: padded length ``L``.

        Returns:
            ``[B, L]`` weights summing to 1 over positions ``< lengths[b]``, exactly 0 beyond; ``[1, L]`` for full sets.
        """
        device = self.linear.weight.device
        # The GRU is tiny and runs one matmul per rank: under autocast, re-casting its weights
        # at each of them costs more than running it in fp32.
        with torch.autocast(device.type, enabled=False):
            if lengths is None:
                return torch.softmax(self._rank_scores(max_len, device, every_size=False).float() / TEMPERATURE, dim=1)
            table = self._rank_scores(max_len, device, every_size=True)  # [L, L]
            scores = table[max_len - lengths]  # [B, L]
            scores = (scores.float() / TEMPERATURE).masked_fill(~valid_mask(lengths, max_len), float("-inf"))
            return torch.softmax(scores, dim=1)  # [B, L]

    def forward(self, features: Tensor, lengths: Tensor | None) -> tuple[Tensor, Tensor]:
        """Pool a padded set of features.

        Args:
            features: ``[B, L, D]``; positions ``>= lengths[b]`` are ignored whatever they hold.
            lengths: ``[B]`` valid counts, ``1 <= lengths <= L``; None when all ``L`` are valid.

        Returns:
            pooled ``[B, D]`` and weights ``[B, L]``.
        """
        weights = self.pool_weights(lengths, features.size(1)).expand(features.size(0), -1)  # [B, L]
        return sorted_weighted_sum(features, lengths, weights), weights


def drop_tokens(
    features: Tensor,
    lengths: Tensor,
    token_draws: Tensor,
    sample_draws: Tensor,
    *,
    p_apply: float = 0.8,
    max_drop: float = 0.2,
) -> tuple[Tensor, Tensor]:
    """Size augmentation given its uniform draws (see :func:`random_token_drop`).

    Sample ``b`` is augmented when ``sample_draws[b] > 1 - p_apply``; then each valid
    token ``i`` survives when ``token_draws[b, i] > max_drop * sample_draws[b]``. If
    no token would survive, the one with the largest draw is kept.

    Args:
        features: ``[B, L, D]``.
        lengths: ``[B]`` valid counts.
        token_draws: ``[B, L]`` uniform [0, 1).
        sample_draws: ``[B]`` uniform [0, 1).

    Returns:
        features ``[B, L, D]`` with the surviving tokens moved to the front in their
        original order and zeros after them, and their counts ``[B]``.
    """
    max_len = features.size(1)
    valid = valid_mask(lengths, max_len)  # [B, L]
    applied = (sample_draws > 1.0 - p_apply).unsqueeze(1)  # [B, 1]
    survive = token_draws > max_drop * sample_draws.unsqueeze(1)  # [B, L]
    keep = valid & (survive | ~applied)  # [B, L]
    # Guarantee a non-empty set: keep the valid token closest to surviving.
    best = token_draws.masked_fill(~valid, float("-inf")).argmax(dim=1, keepdim=True)  # [B, 1]
    empty = ~keep.any(dim=1, keepdim=True)  # [B, 1]
    keep = keep | (empty & (torch.arange(max_len, device=features.device) == best))
    new_lengths = keep.sum(dim=1)  # [B]
    # Stable sort on "dropped" moves kept tokens to the front without reordering them.
    order = (~keep).to(torch.uint8).sort(dim=1, stable=True).indices  # [B, L]
    moved = features.gather(1, order.unsqueeze(-1).expand_as(features))  # [B, L, D]
    moved = moved * valid_mask(new_lengths, max_len).unsqueeze(-1).to(features.dtype)
    return moved, new_lengths.to(lengths.dtype)


def random_token_drop(
    features: Tensor,
    lengths: Tensor,
    *,
    generator: torch.Generator | None = None,
    p_apply: float = 0.8,
    max_drop: float = 0.2,
) -> tuple[Tensor, Tensor]:
    """VSE-infinity's size augmentation: randomly drop tokens so GPO sees varied set sizes.

    With probability ``p_apply`` a sample draws ``r ~ U(1 - p_apply, 1)`` and drops
    each valid token with probability ``max_drop * r``; otherwise it is kept whole.
    Draws come from ``generator`` (on its own device) and are moved to
    ``features.device``.

    Args:
        features: ``[B, L, D]``.
        lengths: ``[B]`` valid counts, ``>= 1``.

    Returns:
        features ``[B, L, D]`` (kept tokens first, in order, zeros after) and new lengths ``[B]``.
    """
    batch, max_len = features.shape[:2]
    draw_device = generator.device if generator is not None else features.device
    token_draws = torch.rand(batch, max_len, generator=generator, device=draw_device).to(features.device)
    sample_draws = torch.rand(batch, generator=generator, device=draw_device).to(features.device)
    return drop_tokens(features, lengths, token_draws, sample_draws, p_apply=p_apply, max_drop=max_drop)
