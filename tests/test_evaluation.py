"""Embedding extraction, scoring outputs and protocols."""

import csv

import numpy as np
import pytest
import torch

from avse.config import from_dict
from avse.data.dataset import PreparedSplit
from avse.errors import DataError
from avse.evaluation import evaluate as ev
from avse.evaluation.embed import encode_captions, encode_images
from avse.evaluation.recall import recall_metrics
from avse.model.avse import build_model


def tiny_split(n_images=6, res=32):
    rng = np.random.default_rng(0)
    cache = rng.integers(0, 256, (n_images, res, res, 3), dtype=np.uint8)
    return PreparedSplit(
        name="test",
        captions=[f"caption {k} of image {i}" for i in range(n_images) for k in range(5)],
        caption_image=np.repeat(np.arange(n_images), 5),
        image_ids=np.arange(100, 100 + n_images),
        image_paths=[f"img{i}.jpg" for i in range(n_images)],
        cache=None,
    ), cache


def test_each_image_is_encoded_once(monkeypatch):
    split, cache = tiny_split()
    monkeypatch.setattr("avse.data.dataset.ImageSource.__getitem__", lambda self, i: cache[i])
    model = build_model(from_dict({"data": {"img_res": 32}}), vocab_size=50)
    seen = []
    model.image_encoder.backbone.embeddings.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[0]))
    embeddings = encode_images(model, split, 32, batch_size=4, device=torch.device("cpu"), resize="stretch")
    assert seen == [4, 2]  # 6 images in two batches: once each, not once per caption
    assert embeddings.shape == (6, 2 * 256)


def test_embeddings_are_deterministic_and_batch_independent(monkeypatch):
    split, cache = tiny_split()
    monkeypatch.setattr("avse.data.dataset.ImageSource.__getitem__", lambda self, i: cache[i])
    model = build_model(from_dict({"data": {"img_res": 32}}), vocab_size=50).train()
    first = encode_images(model, split, 32, batch_size=6, device=torch.device("cpu"), resize="stretch")
    second = encode_images(model, split, 32, batch_size=4, device=torch.device("cpu"), resize="stretch")
    torch.testing.assert_close(first, second, rtol=1e-5, atol=1e-6)
    assert model.training  # restored after evaluation

    class Tokenize:
        def __call__(self, captions):
            ids = torch.tensor([[2] + [5 + len(c) % 40, 6 + ord(c[-1]) % 40] + [3] for c in captions])
            return ids, torch.ones_like(ids)

    caps = encode_captions(model, split.captions, Tokenize(), batch_size=7, device=torch.device("cpu"))
    assert caps.shape == (30, 256)


def test_layout_check_names_the_problem():
    images = torch.randn(2, 8)
    embeddings = ev.Embeddings(images, torch.arange(2), torch.randn(9, 8), torch.tensor([0] * 5 + [1] * 4), {})
    with pytest.raises(DataError, match="captions are not 5 per image"):
        ev.check_layout(embeddings)


def test_protocols():
    assert ev.resolve_protocols("auto", "coco") == ("5fold1k", "5k")
    assert ev.resolve_protocols("auto", "f30k") == ("1k",)
    sims = torch.randn(2000, 10000)
    assert ev.protocol_metrics(sims, "5k") == recall_metrics(sims)
    halves = [recall_metrics(sims[:1000, :5000]), recall_metrics(sims[1000:, 5000:])]
    assert ev.protocol_metrics(sims, "5fold1k")["rsum"] == pytest.approx((halves[0]["rsum"] + halves[1]["rsum"]) / 2)


def test_per_query_results(tmp_path):
    # Image 0's captions are 0-4, image 1's 5-9. Caption 2 prefers image 1; image 1's best own caption is beaten once.
    sims = torch.zeros(2, 10)
    sims[0, :5] = torch.tensor([0.9, 0.8, 0.1, 0.7, 0.6])
    sims[1, 5:] = torch.tensor([0.5, 0.4, 0.3, 0.2, 0.1])
    sims[1, 2] = 0.95
    captions = [f"c{j}" for j in range(10)]
    ev.write_per_query(sims, captions, torch.tensor([10, 11]), ["a.jpg", "b.jpg"], tmp_path)
    t2i = list(csv.DictReader((tmp_path / "t2i.csv").open()))
    assert len(t2i) == 10
    assert (t2i[2]["caption"], t2i[2]["image_id"], t2i[2]["rank"], t2i[2]["top1_image_id"]) == ("c2", "10", "1", "11")
    assert t2i[0]["rank"] == "0" and float(t2i[0]["top1_score"]) == pytest.approx(0.9)
    i2t = list(csv.DictReader((tmp_path / "i2t.csv").open()))
    assert (i2t[1]["image_id"], i2t[1]["rank"], i2t[1]["top1_caption"], i2t[1]["top2_caption"]) == ("11", "1", "c2", "c5")


def test_recall_curve_files(tmp_path):
    sims = torch.eye(3).repeat_interleave(5, dim=1)
    rows = ev.write_recall_curve(sims, tmp_path / "curve.csv", tmp_path / "curve.png", "t")
    assert rows[0] == {"k": 1, "i2t_recall": 100.0, "t2i_recall": 100.0}
    assert (tmp_path / "curve.csv").read_text().splitlines()[:2] == ["k,i2t_recall,t2i_recall", "1,100.0,100.0"]
    assert (tmp_path / "curve.png").read_bytes()[:4] == b"\x89PNG"


def test_results_table():
    table = ev.format_table({"1k": recall_metrics(torch.eye(2).repeat_interleave(5, dim=1))})
    header, rule, row = table.splitlines()
    assert header.split() == ["protocol", "i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum", "i2t_medr", "t2i_medr"]
    assert row.split() == ["1k", "100.0", "100.0", "100.0", "100.0", "100.0", "100.0", "600.0", "1.0", "1.0"]
