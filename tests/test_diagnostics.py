"""AVSE's diagnostics against a case worked out by hand."""

import math

import pytest
import torch

from avse.evaluation.diagnostics import block_diagnostics


def test_block_diagnostics_of_a_hand_made_case():
    # Two images, 2 views of 2 blocks of 2 dimensions; one caption each, of 2 text blocks.
    views = {
        0: ([[1.0, 0.0], [0.0, 1.0]], [[0.6, 0.8], [-0.8, 0.6]]),  # views at cosine 0.6
        1: ([[1.0, 0.0], [0.0, 1.0]], [[-1.0, 0.0], [0.0, -1.0]]),  # views at cosine -1
    }
    img = torch.stack([torch.cat([torch.tensor(view).flatten() / math.sqrt(2) for view in views[i]]) for i in (0, 1)])  # [2, 8]
    cap = torch.tensor([[1.0, 0.0, 0.0, 1.0],     # caption 0: blocks 0 and 1 of image 0
                        [0.6, 0.8, -1.0, 0.1]])   # caption 1: block 1 (view 0) and block 2 (view 1) of image 1
    result = block_diagnostics(img, cap, block_dim=2, views=2, captions_per_image=1)
    # Chosen blocks 0, 1, 1, 2: shares 1/4, 1/2, 1/4 -> 1.5 bits; 2 distinct blocks per caption; 3 of 4 in view 0.
    assert result == pytest.approx({"view_cosine": (0.6 - 1.0) / 2, "block_entropy": 1.5, "distinct_blocks": 2.0,
                                    "view_share_0": 0.75, "view_share_1": 0.25})


def test_one_view_that_every_text_block_matches_in_one_block():
    img = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)
    cap = img[:, :4].repeat_interleave(5, dim=0).repeat(1, 2)  # both text blocks are image block 0 of their own image
    result = block_diagnostics(img, cap, block_dim=4, views=1)
    assert result == pytest.approx({"view_cosine": 1.0, "block_entropy": 0.0, "distinct_blocks": 1.0, "view_share_0": 1.0})
