import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from avse.model.similarity import _log_sinkhorn, meta_similarity, sinkhorn_similarity


def blocks_of(embedding: torch.Tensor, block_dim: int) -> list[torch.Tensor]:
    return [embedding[k : k + block_dim] for k in range(0, embedding.numel(), block_dim)]


def reference_meta_similarity(img: torch.Tensor, cap: torch.Tensor, block_dim: int) -> torch.Tensor:
    """s[i, j] = sum over text blocks t of max over image blocks v of cos(v, t), by plain loops."""
    sims = torch.zeros(img.size(0), cap.size(0), dtype=torch.float64)
    for i in range(img.size(0)):
        for j in range(cap.size(0)):
            total = 0.0
            for text_block in blocks_of(cap[j], block_dim):
                total += max(
                    float(F.cosine_similarity(image_block, text_block, dim=0))
                    for image_block in blocks_of(img[i], block_dim)
                )
            sims[i, j] = total
    return sims


def reference_sinkhorn_pair(
    image: torch.Tensor, caption: torch.Tensor, block_dim: int, dustbin: float, iters: int, temperature: float
) -> float:
    """One pair, in probability space (matrix scaling), float64: an independent form of the same plan."""
    cos = torch.tensor(
        [
            [float(F.cosine_similarity(v, t, dim=0)) for t in blocks_of(caption, block_dim)]
            for v in blocks_of(image, block_dim)
        ],
        dtype=torch.float64,
    )  # [nv, nt]
    n_views, n_text = cos.shape
    scores = torch.full((n_views + 1, n_text + 1), dustbin, dtype=torch.float64)
    scores[:n_views, :n_text] = cos
    kernel = torch.exp(scores / temperature)
    row_mass = torch.tensor([1.0] * n_views + [float(n_text)], dtype=torch.float64)
    col_mass = torch.tensor([1.0] * n_text + [float(n_views)], dtype=torch.float64)
    col_scale = torch.ones(n_text + 1, dtype=torch.float64)
    for _ in range(iters):
        row_scale = row_mass / (kernel @ col_scale)
        col_scale = col_mass / (kernel.T @ row_scale)
    plan = row_scale[:, None] * kernel * col_scale[None, :]
    return float((plan[:n_views, :n_text] * cos).sum())


def best_assignment_score(image: torch.Tensor, caption: torch.Tensor, block_dim: int) -> float:
    """Most total cosine over assignments of text blocks to distinct image blocks (brute force)."""
    cos = [
        [float(F.cosine_similarity(v, t, dim=0)) for t in blocks_of(caption, block_dim)]
        for v in blocks_of(image, block_dim)
    ]
    n_views, n_text = len(cos), len(cos[0])
    return max(
        sum(cos[v][t] for t, v in enumerate(views)) for views in itertools.permutations(range(n_views), n_text)
    )


@pytest.mark.parametrize(
    ("n_images", "n_captions", "img_dim", "cap_dim", "block_dim", "chunk_size"),
    [
        (5, 7, 12, 8, 4, 2),  # 3 views, 2 text blocks, chunks dividing neither N nor M
        (4, 9, 8, 12, 4, 4),  # more text blocks than image blocks
        (3, 5, 16, 16, 2, 100),  # one tile larger than the matrix
        (6, 4, 6, 3, 3, 5),
    ],
)
def test_meta_similarity_matches_loops(n_images, n_captions, img_dim, cap_dim, block_dim, chunk_size):
    torch.manual_seed(0)
    img = torch.randn(n_images, img_dim)
    cap = torch.randn(n_captions, cap_dim)
    sims = meta_similarity(img, cap, block_dim, chunk_size)
    assert sims.shape == (n_images, n_captions) and sims.dtype == torch.float32
    torch.testing.assert_close(sims.double(), reference_meta_similarity(img, cap, block_dim), rtol=1e-5, atol=1e-5)


def test_one_block_is_cosine_similarity():
    torch.manual_seed(1)
    img, cap = torch.randn(7, 32), torch.randn(11, 32)
    expected = F.normalize(img, dim=1) @ F.normalize(cap, dim=1).T
    torch.testing.assert_close(meta_similarity(img, cap, 32, chunk_size=3), expected)


def test_bfloat16_scoring_is_close_and_keeps_input_dtype():
    torch.manual_seed(2)
    img, cap = torch.randn(6, 16), torch.randn(10, 8)
    sims = meta_similarity(img, cap, 4, dtype=torch.bfloat16)
    assert sims.dtype == torch.float32
    torch.testing.assert_close(sims, meta_similarity(img, cap, 4), rtol=0, atol=0.05)


@pytest.mark.parametrize("score", [meta_similarity, sinkhorn_similarity])
def test_dims_not_multiple_of_block_raise(score):
    extra = () if score is meta_similarity else (torch.tensor(0.0),)
    with pytest.raises(ValueError, match="image embedding dim 10 is not a multiple of block_dim 4"):
        score(torch.randn(2, 10), torch.randn(3, 8), 4, *extra)
    with pytest.raises(ValueError, match="caption embedding dim 6 is not a multiple of block_dim 4"):
        score(torch.randn(2, 8), torch.randn(3, 6), 4, *extra)
    with pytest.raises(ValueError, match="chunk_size"):
        score(torch.randn(2, 8), torch.randn(3, 8), 4, *extra, chunk_size=0)


def test_meta_similarity_gradcheck():
    torch.manual_seed(3)
    img = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    cap = torch.randn(4, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: meta_similarity(a, b, 2, chunk_size=2), (img, cap))


def test_sinkhorn_plan_marginals():
    torch.manual_seed(4)
    n_views, n_text, n_pairs = 5, 3, 7
    logits = torch.randn(n_views + 1, n_text + 1, n_pairs, dtype=torch.float64) * 3
    row_mass = torch.tensor([1.0] * n_views + [n_text], dtype=torch.float64).view(-1, 1, 1)
    col_mass = torch.tensor([1.0] * n_text + [n_views], dtype=torch.float64).view(1, -1, 1)

    plan = _log_sinkhorn(logits, row_mass.log(), col_mass.log(), iters=3).exp()
    # The column (text block) update comes last: exact after any number of iterations.
    torch.testing.assert_close(plan.sum(dim=0, keepdim=True), col_mass.expand(1, -1, n_pairs))

    plan = _log_sinkhorn(logits, row_mass.log(), col_mass.log(), iters=300).exp()
    torch.testing.assert_close(plan.sum(dim=1, keepdim=True), row_mass.expand(-1, 1, n_pairs))
    torch.testing.assert_close(plan.sum(dim=0, keepdim=True), col_mass.expand(1, -1, n_pairs))


@pytest.mark.parametrize(
    ("iters", "temperature", "dustbin", "img_dim", "cap_dim"),
    [
        (1, 0.5, 0.0, 12, 8),  # 3 image blocks, 2 text blocks
        (20, 0.1, 0.3, 12, 8),
        (50, 0.05, -0.5, 12, 8),
        (20, 0.1, -0.5, 8, 12),  # 2 image blocks, 3 text blocks
    ],
)
def test_sinkhorn_similarity_matches_per_pair_reference(iters, temperature, dustbin, img_dim, cap_dim):
    torch.manual_seed(5)
    img, cap = torch.randn(5, img_dim), torch.randn(7, cap_dim)
    sims = sinkhorn_similarity(img, cap, 4, torch.tensor(dustbin), iters, chunk_size=3, temperature=temperature)
    expected = torch.tensor(
        [
            [reference_sinkhorn_pair(img[i], cap[j], 4, dustbin, iters, temperature) for j in range(7)]
            for i in range(5)
        ],
        dtype=torch.float64,
    )
    assert sims.shape == (5, 7) and sims.dtype == torch.float32
    torch.testing.assert_close(sims.double(), expected, rtol=1e-4, atol=1e-5)


def test_sinkhorn_sharp_limit_is_optimal_assignment():
    torch.manual_seed(6)
    img, cap = torch.randn(4, 8, dtype=torch.float64), torch.randn(5, 6, dtype=torch.float64)  # 4 views, 3 text blocks
    sims = sinkhorn_similarity(img, cap, 2, torch.tensor(-2.0), iters=2000, temperature=0.005)
    expected = torch.tensor([[best_assignment_score(img[i], cap[j], 2) for j in range(5)] for i in range(4)])
    torch.testing.assert_close(sims, expected.double(), rtol=0, atol=0.01)
    assert (sims <= meta_similarity(img, cap, 2) + 0.02).all()


def test_sinkhorn_sharp_limit_is_meta_similarity_when_best_views_differ():
    torch.manual_seed(7)
    text_blocks = torch.randn(2, 3, 4, dtype=torch.float64)  # [M, nt, b]
    # Image i's block t is a noisy copy of caption i's block t, so every text block of
    # caption i has its own best image block; block 3 is extra noise.
    img = torch.cat([text_blocks + 0.1 * torch.randn_like(text_blocks), torch.randn(2, 1, 4, dtype=torch.float64)], 1)
    img, cap = img.reshape(2, 16), text_blocks.reshape(2, 12)
    sims = sinkhorn_similarity(img, cap, 4, torch.tensor(-2.0), iters=2000, temperature=0.005)
    meta = meta_similarity(img, cap, 4)
    torch.testing.assert_close(sims.diagonal(), meta.diagonal(), rtol=0, atol=0.02)


def test_sinkhorn_high_dustbin_scores_nothing():
    torch.manual_seed(8)
    sims = sinkhorn_similarity(torch.randn(3, 8), torch.randn(4, 8), 4, torch.tensor(3.0), iters=50, temperature=0.05)
    torch.testing.assert_close(sims, torch.zeros(3, 4), rtol=0, atol=1e-4)


def test_sinkhorn_gradcheck_including_dustbin():
    torch.manual_seed(9)
    img = torch.randn(2, 6, dtype=torch.float64, requires_grad=True)
    cap = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    dustbin = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda a, b, z: sinkhorn_similarity(a, b, 2, z, iters=5, chunk_size=2, temperature=0.5), (img, cap, dustbin)
    )


def test_sinkhorn_rejects_bad_settings():
    img, cap, dustbin = torch.randn(2, 8), torch.randn(3, 8), torch.tensor(0.0)
    with pytest.raises(ValueError, match="iters"):
        sinkhorn_similarity(img, cap, 4, dustbin, iters=0)
    with pytest.raises(ValueError, match="temperature"):
        sinkhorn_similarity(img, cap, 4, dustbin, temperature=-math.inf)
