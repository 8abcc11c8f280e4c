"""AVSE's mechanism in numbers: do an image's views differ, and which image blocks do captions use?

Computed from the embeddings an evaluation already has (no second pass), for each caption
against its own image:

- `view_cosine`: the mean cosine between two views of the same image (1: the views are one vector);
- `block_entropy`: the entropy, in bits, of which image block the text blocks choose (the block
  with the highest cosine), over all captions and text blocks (0: always the same block;
  log2 of the number of image blocks: every block equally often);
- `distinct_blocks`: the mean number of different image blocks a caption's text blocks choose
  (1: all text blocks of a caption match one image block);
- `view_share_<v>`: the share of those choices that fall in view `v` (1 / views: balanced).

`view_cosines` and `chosen_blocks` give the same per image and per caption, and `choice_diagnostics`
summarises any subset of captions' choices, for the failure notebook.
"""

from __future__ import annotations

import torch
from torch import Tensor

from avse.model.similarity import _normalized_blocks


def view_cosines(img: Tensor, views: int) -> Tensor:
    """`[N]` mean cosine between the views of each image (`img` `[N, V * E]`, each view unit-norm; 1 for one view)."""
    n_images = img.size(0)
    if views == 1:
        return torch.ones(n_images)
    per_view = img.float().view(n_images, views, -1)  # [N, V, E]
    cosines = per_view @ per_view.transpose(1, 2)  # [N, V, V]
    first, second = torch.triu_indices(views, views, offset=1)
    return cosines[:, first, second].mean(dim=1)


def chosen_blocks(img: Tensor, cap: Tensor, block_dim: int, caption_image: Tensor) -> Tensor:
    """`[M, T]`: for each text block of each caption (`cap` `[M, Dt]`), the image block (0 .. B - 1, view-major)
    of its own image (`caption_image` `[M]`, positions in `img` `[N, Di]`) with the highest cosine."""
    image_blocks = _normalized_blocks(img.float(), block_dim, "image")  # [N, B, b]
    text_blocks = _normalized_blocks(cap.float(), block_dim, "caption")  # [M, T, b]
    return torch.einsum("mtd,mbd->mtb", text_blocks, image_blocks[caption_image.long()]).argmax(dim=-1)


def distinct_per_caption(chosen: Tensor) -> Tensor:
    """`[M]` number of different image blocks among each caption's choices (`chosen` `[M, T]`)."""
    return (chosen.sort(dim=1).values.diff(dim=1) != 0).sum(dim=1) + 1


def choice_diagnostics(chosen: Tensor, n_blocks: int, views: int) -> dict[str, float]:
    """`block_entropy`, `distinct_blocks` and `view_share_<v>` of :func:`chosen_blocks`' `[M, T]` choices
    among `n_blocks` image blocks (view-major)."""
    shares = torch.bincount(chosen.flatten(), minlength=n_blocks).double() / chosen.numel()
    nonzero = shares[shares > 0]
    view_shares = shares.view(views, n_blocks // views).sum(dim=1)
    return {"block_entropy": float(-(nonzero * nonzero.log2()).sum()),
            "distinct_blocks": float(distinct_per_caption(chosen).double().mean()),
            **{f"view_share_{v}": float(share) for v, share in enumerate(view_shares)}}


def block_diagnostics(img: Tensor, cap: Tensor, block_dim: int, views: int, caption_image: Tensor) -> dict[str, float]:
    """The numbers of the module docstring; arguments as :func:`chosen_blocks`."""
    chosen = chosen_blocks(img, cap, block_dim, caption_image)
    return {"view_cosine": float(view_cosines(img, views).mean()), **choice_diagnostics(chosen, img.size(1) // block_dim, views)}
