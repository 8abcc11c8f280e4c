"""Image-text similarity by meta-semantic blocks (AVSE).

Every embedding is cut into consecutive blocks of ``block_dim`` dimensions, the
"meta-semantic embeddings", and every block is L2-normalised on its own. An image
embedding of ``Di`` dimensions gives ``nv = Di // block_dim`` blocks (its views), a
caption embedding of ``Dt`` dimensions gives ``nt = Dt // block_dim`` blocks.

- :func:`meta_similarity` lets every text block pick its best image block:
  ``s[i, j] = sum_t max_v cos(img[i, v], cap[j, t])``.
- :func:`sinkhorn_similarity` matches text blocks to image blocks by entropic
  optimal transport with dustbins, so that one image block cannot serve every
  text block at full weight.

Both score all ``N x M`` pairs tile by tile: a tile of ``chunk_size`` images by
``chunk_size`` captions is one matrix multiply of the tile's image blocks against
its text blocks followed by reductions, so the intermediate has a fixed size
whatever ``N`` and ``M`` are. Both are differentiable.
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def _normalized_blocks(embeddings: Tensor, block_dim: int, name: str) -> Tensor:
    """Split ``[n, D]`` embeddings into ``[n, D // block_dim, block_dim]`` unit-norm blocks."""
    if embeddings.dim() != 2:
        raise ValueError(f"{name} embeddings must be 2-D [n, dim], got shape {tuple(embeddings.shape)}")
    dim = embeddings.size(1)
    if block_dim <= 0 or dim % block_dim != 0:
        raise ValueError(f"{name} embedding dim {dim} is not a multiple of block_dim {block_dim}")
    blocks = embeddings.reshape(embeddings.size(0), dim // block_dim, block_dim)  # [n, D / b, b]
    return F.normalize(blocks, dim=-1)


def _check_chunk_size(chunk_size: int) -> None:
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")


def _leading_view(buffer: Tensor | None, shape: tuple[int, ...]) -> Tensor | None:
    """The first ``prod(shape)`` elements of a flat ``buffer`` viewed as ``shape``; None without a buffer."""
    return None if buffer is None else buffer[: math.prod(shape)].view(shape)


def _tiles(n_images: int, n_captions: int, chunk_size: int, text_by_block: Tensor):
    """Tiles of at most ``chunk_size`` images by ``chunk_size`` captions, column by column.

    Yields ``((img_start, img_end), (cap_start, cap_end), text_rows)`` with ``text_rows``
    the tile's text blocks ``[nt * cj, b]``, rows ordered ``(t, j)``: one contiguous copy
    per column of tiles, reused by every tile of that column.
    """
    n_text_blocks, _, block_dim = text_by_block.shape
    for cap_start in range(0, n_captions, chunk_size):
        cap_end = min(cap_start + chunk_size, n_captions)
        text_rows = text_by_block[:, cap_start:cap_end].reshape(n_text_blocks * (cap_end - cap_start), block_dim)
        for img_start in range(0, n_images, chunk_size):
            yield (img_start, min(img_start + chunk_size, n_images)), (cap_start, cap_end), text_rows


def meta_similarity(
    img: Tensor,
    cap: Tensor,
    block_dim: int,
    chunk_size: int = 256,
    *,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Exact AVSE similarity: every text block is scored against its best image block.

    ``s[i, j] = sum_t max_v cos(img[i, v], cap[j, t])`` with ``v`` over the ``nv`` image
    blocks and ``t`` over the ``nt`` text blocks. With a single block on each side
    (``block_dim`` equal to both embedding sizes) this is the plain cosine similarity.

    The blocks are normalised once, up front. Then each tile of ``ci <= chunk_size``
    images by ``cj <= chunk_size`` captions is one GEMM:

    - image rows ordered ``(i, v)``: ``[ci * nv, b]``
    - text rows ordered ``(t, j)``: ``[nt * cj, b]``
    - scores ``[ci * nv, nt * cj]``, viewed as ``[ci, nv, nt, cj]``
    - max over ``nv`` -> ``[ci, nt, cj]``, sum over ``nt`` -> ``[ci, cj]``

    Both reductions run over an outer axis, i.e. element-wise over contiguous rows of
    length ``nt * cj`` and ``cj``, which vectorises well; the GEMM dominates the time.
    The intermediate holds at most ``chunk_size**2 * nv * nt`` elements. The default
    256 gives 8.4 MB in fp32 for ``nv = 8``, ``nt = 4``: it stays in a CPU's L3 cache,
    so the max reads what the GEMM just wrote from cache, and the GEMM still runs as
    fast as one big GEMM. Without autograd it lives in a buffer reused by every tile.
    The best tile size depends on the device: ``benchmarks/scoring.py --chunk-size``.

    Args:
        img: ``[N, Di]`` image embeddings, ``Di`` a multiple of ``block_dim``.
        cap: ``[M, Dt]`` caption embeddings, ``Dt`` a multiple of ``block_dim``.
        block_dim: size ``b`` of one meta-semantic block.
        chunk_size: most images and most captions per tile; bounds memory, not the result.
        dtype: dtype of the GEMM and of the max, e.g. ``torch.bfloat16`` on GPUs for
            faster, approximate scoring (cosines rounded to about 3 significant digits).
            The sums over text blocks and the result stay in the inputs' dtype. Default:
            the inputs' dtype, which is exact. CPUs without native bf16 matrix units run
            bf16 GEMMs far slower than fp32.

    Returns:
        ``[N, M]`` similarities, in the inputs' (promoted) dtype.

    Raises:
        ValueError: an embedding dim is not a multiple of ``block_dim``, or the inputs
            are not 2-D, or ``chunk_size < 1``.
    """
    _check_chunk_size(chunk_size)
    result_dtype = torch.promote_types(img.dtype, cap.dtype)
    compute_dtype = dtype or result_dtype
    img_blocks = _normalized_blocks(img.to(result_dtype), block_dim, "image")  # [N, nv, b]
    cap_blocks = _normalized_blocks(cap.to(result_dtype), block_dim, "caption")  # [M, nt, b]
    n_images, n_views, _ = img_blocks.shape
    n_captions, n_text_blocks, _ = cap_blocks.shape

    image_rows = img_blocks.to(compute_dtype).reshape(n_images * n_views, block_dim)  # [N * nv, b], rows (i, v)
    text_by_block = cap_blocks.to(compute_dtype).transpose(0, 1)  # [nt, M, b]

    # Without autograd, the GEMM and the max write into buffers reused by every tile:
    # a fresh multi-megabyte output per tile costs page faults and zero-filling worth
    # about a tenth of the GEMM on CPU. Autograd needs new tensors (out= is not differentiable).
    reuse_buffers = not (torch.is_grad_enabled() and (img.requires_grad or cap.requires_grad))
    tile_images_max, tile_captions_max = min(chunk_size, n_images), min(chunk_size, n_captions)
    cos_buffer = max_buffer = None
    if reuse_buffers:
        cos_buffer = img.new_empty(tile_images_max * n_views * n_text_blocks * tile_captions_max, dtype=compute_dtype)
        max_buffer = img.new_empty(tile_images_max * n_text_blocks * tile_captions_max, dtype=compute_dtype)

    sims = img.new_empty(n_images, n_captions, dtype=result_dtype)
    for (img_start, img_end), (cap_start, cap_end), text_rows in _tiles(n_images, n_captions, chunk_size, text_by_block):
        tile_images, tile_captions = img_end - img_start, cap_end - cap_start
        block_cos = torch.matmul(
            image_rows[img_start * n_views : img_end * n_views],
            text_rows.T,
            out=_leading_view(cos_buffer, (tile_images * n_views, n_text_blocks * tile_captions)),
        )  # [ci * nv, nt * cj]
        best_view = torch.amax(
            block_cos.view(tile_images, n_views, n_text_blocks, tile_captions),  # [ci, nv, nt, cj]
            dim=1,
            out=_leading_view(max_buffer, (tile_images, n_text_blocks, tile_captions)),
        )  # [ci, nt, cj]
        sims[img_start:img_end, cap_start:cap_end] = best_view.sum(dim=1, dtype=result_dtype)  # [ci, cj]
    return sims


def _log_sinkhorn(logits: Tensor, log_row_mass: Tensor, log_col_mass: Tensor, iters: int) -> Tensor:
    """Log of the entropic transport plan for a batch of problems, pairs on the last axis.

    Args:
        logits: ``[R, C, P]`` scores over temperature, for ``P`` independent problems.
        log_row_mass: ``[R, 1, 1]`` log of the mass each row must send.
        log_col_mass: ``[1, C, 1]`` log of the mass each column must receive.
        iters: alternating row and column normalisations; the column one comes last,
            so the column marginals are exact and the row marginals converge.

    Returns:
        ``[R, C, P]`` log plan ``logits + log_u + log_v``.
    """
    log_u = torch.zeros_like(logits[:, :1])  # [R, 1, P]
    log_v = torch.zeros_like(logits[:1])  # [1, C, P]
    for _ in range(iters):
        # The reduced axes are outer axes, so logsumexp runs element-wise over the P pairs.
        log_u = log_row_mass - torch.logsumexp(logits + log_v, dim=1, keepdim=True)  # [R, 1, P]
        log_v = log_col_mass - torch.logsumexp(logits + log_u, dim=0, keepdim=True)  # [1, C, P]
    return logits + log_u + log_v


def sinkhorn_similarity(
    img: Tensor,
    cap: Tensor,
    block_dim: int,
    dustbin: Tensor,
    iters: int = 20,
    chunk_size: int = 128,
    *,
    temperature: float = 0.1,
) -> Tensor:
    """Similarity from an optimal-transport matching of text blocks to image blocks.

    For one pair, with ``C = cos(img[i, v], cap[j, t])`` of shape ``[nv, nt]`` and the
    dustbin score ``z``, the problem is the SuperGlue one:

    - scores ``S`` of shape ``[nv + 1, nt + 1]``: ``C`` bordered by a dustbin row and a
      dustbin column (corner included) that all hold ``z``;
    - marginals: every image block sends mass 1 and the dustbin row sends ``nt``;
      every text block receives mass 1 and the dustbin column receives ``nv``. So each
      text block spreads unit mass over the image blocks and the dustbin, each image
      block takes at most unit mass from the text blocks, and both totals are ``nv + nt``;
    - plan ``P = exp(S / temperature + log_u + log_v)`` after ``iters`` log-space
      Sinkhorn iterations, ending on the text-block (column) update so that every text
      block carries exactly unit mass;
    - similarity ``sum_{v < nv, t < nt} P[v, t] * C[v, t]``: mass sent to a dustbin
      scores nothing.

    Because each image block takes at most unit mass, this is a soft one-to-one
    matching. As ``temperature -> 0`` the plan tends to the matching of text blocks to
    distinct image blocks that maximises ``sum (C[v, t] - z)`` over matched pairs (all
    dustbin entries hold ``z``, so the rest of the plan adds a constant). For ``z``
    below -1 every pair gains, so as many text blocks as possible are matched (all
    when ``nv >= nt``) and the limit is the optimal assignment score: at most
    :func:`meta_similarity`, and equal to it when the text blocks' best image blocks
    are all different. For ``z`` above 1 no pair gains, and the limit is 0.

    Pairs are scored tile by tile: the block cosines of a tile of ``ci`` images by
    ``cj`` captions are one GEMM, laid out as ``[nv, nt, ci * cj]`` so that the Sinkhorn
    reductions over blocks run element-wise over the pairs. Without autograd, memory is
    bounded by the tile, a few ``[nv + 1, nt + 1, chunk_size**2]`` tensors; with
    autograd every iteration of every tile is kept for the backward pass.

    Args:
        img: ``[N, Di]`` image embeddings, ``Di`` a multiple of ``block_dim``.
        cap: ``[M, Dt]`` caption embeddings, ``Dt`` a multiple of ``block_dim``.
        block_dim: size ``b`` of one meta-semantic block.
        dustbin: scalar score ``z`` of leaving a block unmatched, usually a learnable
            parameter; gradients flow into it.
        iters: Sinkhorn iterations (each one row and one column normalisation).
        chunk_size: most images and most captions per tile.
        temperature: entropic regularisation; cosines and ``z`` are divided by it.
            Smaller is sharper and needs more iterations to converge.

    Returns:
        ``[N, M]`` similarities, in the inputs' (promoted) dtype.

    Raises:
        ValueError: an embedding dim is not a multiple of ``block_dim``, the inputs
            are not 2-D, or ``iters``, ``chunk_size`` or ``temperature`` is out of range.
    """
    _check_chunk_size(chunk_size)
    if iters < 1:
        raise ValueError(f"iters must be at least 1, got {iters}")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    result_dtype = torch.promote_types(img.dtype, cap.dtype)
    img_blocks = _normalized_blocks(img.to(result_dtype), block_dim, "image")  # [N, nv, b]
    cap_blocks = _normalized_blocks(cap.to(result_dtype), block_dim, "caption")  # [M, nt, b]
    n_images, n_views, _ = img_blocks.shape
    n_captions, n_text_blocks, _ = cap_blocks.shape
    device = img.device
    dustbin_logit = torch.as_tensor(dustbin).to(device=device, dtype=result_dtype) / temperature  # scalar

    # Rows: nv image blocks with mass 1, then the dustbin row with mass nt.
    log_row_mass = torch.zeros(n_views + 1, 1, 1, dtype=result_dtype, device=device)  # [nv + 1, 1, 1]
    log_row_mass[-1] = math.log(n_text_blocks)
    # Columns: nt text blocks with mass 1, then the dustbin column with mass nv.
    log_col_mass = torch.zeros(1, n_text_blocks + 1, 1, dtype=result_dtype, device=device)  # [1, nt + 1, 1]
    log_col_mass[:, -1] = math.log(n_views)

    image_rows = img_blocks.reshape(n_images * n_views, block_dim)  # [N * nv, b], rows (i, v)
    text_by_block = cap_blocks.transpose(0, 1)  # [nt, M, b]

    sims = img.new_empty(n_images, n_captions, dtype=result_dtype)
    for (img_start, img_end), (cap_start, cap_end), text_rows in _tiles(n_images, n_captions, chunk_size, text_by_block):
        tile_images, tile_captions = img_end - img_start, cap_end - cap_start
        n_pairs = tile_images * tile_captions
        block_cos = image_rows[img_start * n_views : img_end * n_views] @ text_rows.T  # [ci * nv, nt * cj]
        block_cos = (
            block_cos.view(tile_images, n_views, n_text_blocks, tile_captions)  # [ci, nv, nt, cj]
            .permute(1, 2, 0, 3)  # [nv, nt, ci, cj]
            .reshape(n_views, n_text_blocks, n_pairs)  # [nv, nt, P], pairs (i, j) innermost
        )
        logits = torch.cat(
            [block_cos / temperature, dustbin_logit.expand(n_views, 1, n_pairs)], dim=1
        )  # [nv, nt + 1, P]
        logits = torch.cat([logits, dustbin_logit.expand(1, n_text_blocks + 1, n_pairs)], dim=0)  # [nv + 1, nt + 1, P]
        plan = _log_sinkhorn(logits, log_row_mass, log_col_mass, iters).exp()  # [nv + 1, nt + 1, P]
        matched = (plan[:n_views, :n_text_blocks] * block_cos).sum(dim=(0, 1))  # [P]
        sims[img_start:img_end, cap_start:cap_end] = matched.view(tile_images, tile_captions)  # [ci, cj]
    return sims


def block_similarity(
    img: Tensor, cap: Tensor, block_dim: int, matching: str, chunk_size: int = 256,
    dustbin: Tensor | None = None, sinkhorn_iters: int = 20,
) -> Tensor:
    """``[N, M]`` scores with the configured matching: ``max`` (:func:`meta_similarity`) or
    ``sinkhorn`` (:func:`sinkhorn_similarity`, which needs the ``dustbin`` score)."""
    if matching == "sinkhorn":
        return sinkhorn_similarity(img, cap, block_dim, dustbin, sinkhorn_iters, chunk_size)
    return meta_similarity(img, cap, block_dim, chunk_size)
