"""AVSE's diagnostics against a case worked out by hand."""

import math

import pandas as pd
import pytest
import torch

from avse.analysis.failures import block_choice_shares, mechanism_by_outcome, mechanism_figure
from avse.evaluation.diagnostics import block_diagnostics
from avse.evaluation.evaluate import Embeddings


def hand_made_case():
    """Two images, 2 views of 2 blocks of 2 dimensions; one caption each, of 2 text blocks."""
    views = {
        0: ([[1.0, 0.0], [0.0, 1.0]], [[0.6, 0.8], [-0.8, 0.6]]),  # views at cosine 0.6
        1: ([[1.0, 0.0], [0.0, 1.0]], [[-1.0, 0.0], [0.0, -1.0]]),  # views at cosine -1
    }
    img = torch.stack([torch.cat([torch.tensor(view).flatten() / math.sqrt(2) for view in views[i]]) for i in (0, 1)])  # [2, 8]
    cap = torch.tensor([[1.0, 0.0, 0.0, 1.0],     # caption 0: blocks 0 and 1 of image 0
                        [0.6, 0.8, -1.0, 0.1]])   # caption 1: block 1 (view 0) and block 2 (view 1) of image 1
    return img, cap


def test_block_diagnostics_of_a_hand_made_case():
    img, cap = hand_made_case()
    result = block_diagnostics(img, cap, block_dim=2, views=2, caption_image=torch.tensor([0, 1]))
    # Chosen blocks 0, 1, 1, 2: shares 1/4, 1/2, 1/4 -> 1.5 bits; 2 distinct blocks per caption; 3 of 4 in view 0.
    assert result == pytest.approx({"view_cosine": (0.6 - 1.0) / 2, "block_entropy": 1.5, "distinct_blocks": 2.0,
                                    "view_share_0": 0.75, "view_share_1": 0.25})


def test_one_view_that_every_text_block_matches_in_one_block():
    img = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)
    cap = img[:, :4].repeat_interleave(5, dim=0).repeat(1, 2)  # both text blocks are image block 0 of their own image
    result = block_diagnostics(img, cap, block_dim=4, views=1, caption_image=torch.arange(15) // 5)
    assert result == pytest.approx({"view_cosine": 1.0, "block_entropy": 0.0, "distinct_blocks": 1.0, "view_share_0": 1.0})


def test_mechanism_by_outcome_splits_the_hand_made_case_by_t2i_hit():
    img, cap = hand_made_case()
    embeddings = Embeddings(img, torch.tensor([10, 11]), cap, torch.tensor([0, 1]), {"block_dim": 2, "views": 2})
    t2i = pd.DataFrame({"caption_index": [1, 0], "rank": [0, 3]})  # caption 1 retrieved its image first, caption 0 did not
    table = mechanism_by_outcome(embeddings, t2i)
    assert list(table.index) == ["all captions", "t2i hit at R@1", "t2i miss at R@1"]
    assert table["captions"].tolist() == [2, 1, 1]
    # The miss (caption 0) chose blocks 0 and 1 of image 0 (views at cosine 0.6); the hit blocks 1 and 2 of image 1 (-1).
    assert table.loc["t2i miss at R@1", ["view_cosine", "block_entropy", "distinct_blocks", "view_share_0"]].tolist() == pytest.approx([0.6, 1.0, 2.0, 1.0])
    assert table.loc["t2i hit at R@1", ["view_cosine", "block_entropy", "view_share_1"]].tolist() == pytest.approx([-1.0, 1.0, 0.5])
    assert table.loc["all captions", "block_entropy"] == pytest.approx(1.5)
    # Caption 0's text blocks chose image blocks 0 and 1, caption 1's blocks 1 and 2.
    assert block_choice_shares(torch.tensor([[0, 1], [1, 2]]), 4).tolist() == [[0.5, 0.5, 0.0, 0.0], [0.0, 0.5, 0.5, 0.0]]
    assert len(mechanism_figure(embeddings).axes) == 4  # three panels and the colour bar
