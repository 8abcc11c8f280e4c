"""AVSE's mechanism in numbers: do an image's views differ, and which image blocks do captions use?

Computed from the embeddings an evaluation already has (no second pass), for each caption
against its own image (caption `j` belongs to image `j // captions_per_image`):

- `view_cosine`: the mean cosine between two views of the same image (1: the views are one vector);
- `block_entropy`: the entropy, in bits, of which image block the text blocks choose (the block
  with the highest cosine), over all captions and text blocks (0: always the same block;
  log2 of the number of image blocks: every block equally often);
- `distinct_blocks`: the mean number of different image blocks a caption's text blocks choose
  (1: all text blocks of a caption match one image block);
- `view_share_<v>`: the share of those choices that fall in view `v` (1 / views: balanced).
"""

from __future__ import annotations

import torch
from torch import Tensor

from avse.model.similarity import _normalized_blocks


def block_diagnostics(img: Tensor, cap: Tensor, block_dim: int, views: int, captions_per_image: int = 5) -> dict[str, float]:
    """`img` `[N, V * E]` (each view unit-norm), `cap` `[N * captions_per_image, Dt]`: the numbers above."""
    n_images = img.size(0)
    per_view = img.float().view(n_images, views, -1)  # [N, V, E]
    if views > 1:
        cosines = per_view @ per_view.transpose(1, 2)  # [N, V, V]
        first, second = torch.triu_indices(views, views, offset=1)
        view_cosine = float(cosines[:, first, second].mean())
    else:
        view_cosine = 1.0
    image_blocks = _normalized_blocks(img.float(), block_dim, "image")  # [N, B, b]
    text_blocks = _normalized_blocks(cap.float(), block_dim, "caption")  # [M, T, b]
    own = torch.arange(cap.size(0), device=cap.device) // captions_per_image  # [M]
    chosen = torch.einsum("mtd,mbd->mtb", text_blocks, image_blocks[own]).argmax(dim=-1)  # [M, T]: the image block of each text block
    n_blocks = image_blocks.size(1)
    counts = torch.bincount(chosen.flatten(), minlength=n_blocks).double()
    shares = counts / counts.sum()
    nonzero = shares[shares > 0]
    entropy = float(-(nonzero * nonzero.log2()).sum())
    distinct = float(((chosen.sort(dim=1).values.diff(dim=1) != 0).sum(dim=1) + 1).double().mean())  # [M] -> mean
    blocks_per_view = n_blocks // views
    view_shares = shares.view(views, blocks_per_view).sum(dim=1)
    return {"view_cosine": view_cosine, "block_entropy": entropy, "distinct_blocks": distinct,
            **{f"view_share_{v}": float(share) for v, share in enumerate(view_shares)}}
