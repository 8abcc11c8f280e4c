"""Tests for avse.model.pooling: GPO and the vectorised size augmentation."""

import pytest
import torch

from avse.model.pooling import GPO, drop_tokens, random_token_drop, sorted_weighted_sum


def padded_batch(lengths: list[int], max_len: int, dim: int, seed: int, pad_value: float = 0.0) -> torch.Tensor:
    feats = torch.randn(len(lengths), max_len, dim, generator=torch.Generator().manual_seed(seed))
    for i, n in enumerate(lengths):
        feats[i, n:] = pad_value
    return feats


def test_weights_on_first_rank_give_max_pool() -> None:
    lengths = torch.tensor([5, 2, 7])
    # Huge padding values would win a max if padding were not excluded.
    feats = padded_batch([5, 2, 7], 7, 4, seed=0, pad_value=100.0)
    weights = torch.zeros(3, 7)
    weights[:, 0] = 1.0
    pooled = sorted_weighted_sum(feats, lengths, weights)
    expected = torch.stack([feats[i, :n].amax(dim=0) for i, n in enumerate(lengths.tolist())])
    assert torch.equal(pooled, expected)
    # Weight on the last valid rank gives the min, again ignoring (very negative) padding.
    feats = padded_batch([5, 2, 7], 7, 4, seed=0, pad_value=-100.0)
    weights = torch.zeros(3, 7).scatter_(1, (lengths - 1).unsqueeze(1), 1.0)
    expected = torch.stack([feats[i, :n].amin(dim=0) for i, n in enumerate(lengths.tolist())])
    assert torch.equal(sorted_weighted_sum(feats, lengths, weights), expected)


def test_gpo_shapes_and_weights() -> None:
    torch.manual_seed(0)
    gpo = GPO(32, 32)
    lengths = torch.tensor([6, 3, 1])
    pooled, weights = gpo(padded_batch([6, 3, 1], 6, 5, seed=1), lengths)
    assert pooled.shape == (3, 5) and weights.shape == (3, 6)
    assert torch.allclose(weights.sum(dim=1), torch.ones(3))
    assert (weights[1, 3:] == 0).all() and (weights[2, 1:] == 0).all()


def test_gpo_weights_stay_fp32_under_bf16_autocast() -> None:
    torch.manual_seed(0)
    gpo = GPO(32, 32)
    lengths = torch.tensor([6, 3, 6, 1])
    expected = gpo.pool_weights(lengths, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        weights = gpo.pool_weights(lengths, 6)
    assert weights.dtype == torch.float32
    assert torch.equal(weights, expected)


@pytest.mark.parametrize("lengths", [[6, 3, 1, 6], [4, 4, 4]])
def test_gpo_batch_matches_each_sample_alone(lengths: list[int]) -> None:
    torch.manual_seed(0)
    gpo = GPO(16, 24)
    max_len = 6
    feats = padded_batch(lengths, max_len, 5, seed=2)
    pooled, weights = gpo(feats, torch.tensor(lengths))
    for i, n in enumerate(lengths):
        alone, alone_w = gpo(feats[i : i + 1, :n], torch.tensor([n]))
        assert torch.allclose(pooled[i], alone[0], atol=1e-6)
        assert torch.allclose(weights[i, :n], alone_w[0], atol=1e-6)


def test_gpo_ignores_padding_content() -> None:
    torch.manual_seed(0)
    gpo = GPO()
    lengths = torch.tensor([4, 2, 5])
    clean = padded_batch([4, 2, 5], 5, 3, seed=3)
    noisy = clean.clone()
    noisy[0, 4:] = 50.0
    noisy[1, 2:] = torch.randn(3, 3) * 1000
    a, wa = gpo(clean, lengths)
    b, wb = gpo(noisy, lengths)
    assert torch.equal(a, b) and torch.equal(wa, wb)


def test_gpo_gradients_reach_parameters() -> None:
    torch.manual_seed(0)
    gpo = GPO()
    feats = padded_batch([5, 3], 5, 4, seed=4).requires_grad_()
    pooled, _ = gpo(feats, torch.tensor([5, 3]))
    pooled.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in gpo.parameters())
    assert torch.isfinite(feats.grad).all() and (feats.grad[1, 3:] == 0).all()


def reference_drop(
    features: torch.Tensor, lengths: torch.Tensor, r1: torch.Tensor, r2: torch.Tensor, max_drop: float = 0.20
) -> tuple[torch.Tensor, torch.Tensor]:
    """VSE-infinity's per-sample loop, restricted to valid positions, with the non-empty fallback."""
    out = torch.zeros_like(features)
    new_lengths = []
    for i in range(features.size(0)):
        n = int(lengths[i])
        if r2[i] > 0.2:
            keep = [j for j in range(n) if r1[i, j] > max_drop * r2[i]]
            if not keep:
                keep = [int(r1[i, :n].argmax())]
        else:
            keep = list(range(n))
        out[i, : len(keep)] = features[i, keep]
        new_lengths.append(len(keep))
    return out, torch.tensor(new_lengths)


def test_drop_tokens_matches_reference_loop() -> None:
    gen = torch.Generator().manual_seed(5)
    batch, max_len = 64, 12
    lengths = torch.randint(1, max_len + 1, (batch,), generator=gen)
    lengths[:8] = max_len
    feats = torch.randn(batch, max_len, 3, generator=gen)
    r1 = torch.rand(batch, max_len, generator=gen)
    r2 = torch.rand(batch, generator=gen)
    out, new_lengths = drop_tokens(feats, lengths, r1, r2)
    ref_out, ref_lengths = reference_drop(feats, lengths, r1, r2)
    assert torch.equal(new_lengths, ref_lengths)
    assert torch.equal(out, ref_out)
    assert (new_lengths < lengths).any() and (new_lengths == lengths).any()


def test_drop_tokens_never_empties_a_sample() -> None:
    feats = torch.randn(2, 4, 3)
    lengths = torch.tensor([4, 3])
    r1 = torch.tensor([[0.1, 0.5, 0.3, 0.2], [0.2, 0.1, 0.4, 0.9]])
    r2 = torch.tensor([0.99, 0.99])
    # max_drop 1.0: every valid draw is below the threshold 0.99.
    out, new_lengths = drop_tokens(feats, lengths, r1, r2, max_drop=1.0)
    ref_out, ref_lengths = reference_drop(feats, lengths, r1, r2, max_drop=1.0)
    assert new_lengths.tolist() == [1, 1] and torch.equal(new_lengths, ref_lengths)
    assert torch.equal(out[0, 0], feats[0, 1]) and torch.equal(out[1, 0], feats[1, 2])  # padding draw 0.9 ignored
    assert torch.equal(out, ref_out)


def test_random_token_drop_preserves_order_and_is_seeded() -> None:
    batch, max_len = 32, 20
    # Feature value = position + 1, so order and padding are visible.
    feats = (torch.arange(max_len, dtype=torch.float32) + 1).expand(batch, max_len).unsqueeze(-1).contiguous()
    lengths = torch.full((batch,), max_len)
    out, new_lengths = random_token_drop(feats, lengths, generator=torch.Generator().manual_seed(0))
    values = out.squeeze(-1)
    for i, n in enumerate(new_lengths.tolist()):
        assert (values[i, :n].diff() > 0).all() and (values[i, n:] == 0).all() and n >= 1
    again, again_lengths = random_token_drop(feats, lengths, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, again) and torch.equal(new_lengths, again_lengths)
    assert (new_lengths < max_len).any()
