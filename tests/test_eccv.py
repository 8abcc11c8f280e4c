"""ECCV Caption and CxC on COCO's 5K test (`avse/evaluation/eccv.py`), on the real testall files in shared/fixtures/coco."""

import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from avse import pipeline
from avse.analysis import failures
from avse.config import load_config
from avse.data.dataset import PreparedSplit
from avse.data.formats import read_karpathy, write_caption_splits
from avse.errors import ConfigError, DataError
from avse.evaluation import eccv
from avse.evaluation.evaluate import Embeddings, coco_test_alignment, score
from avse.evaluation.recall import recall_metrics
from avse.tracking import Tracker
from conftest import REPO, mlflow_client

COCO_FIXTURES = Path(os.environ.get("AVSE_COCO_FIXTURES", REPO.parent / "shared" / "fixtures" / "coco"))


@pytest.fixture(scope="module")
def testall_ids() -> list[int]:
    path = COCO_FIXTURES / "testall_ids.txt"
    if not path.exists():
        pytest.skip(f"COCO 5K test caption fixtures not found at {COCO_FIXTURES}")
    return [int(line) for line in path.read_text().split()]


@pytest.fixture(scope="module")
def annotations() -> eccv.CocoTestAnnotations:
    return eccv.CocoTestAnnotations()


@pytest.fixture(scope="module")
def alignment(testall_ids, annotations) -> eccv.Alignment:
    return eccv.Alignment(annotations.align(testall_ids), np.asarray(testall_ids[::5], dtype=np.int64))


def pair_scores(alignment: eccv.Alignment, pairs: dict[int, list[int]], direction: str) -> torch.Tensor:
    """`[5000, 25000]`: 1 where the ground truth `pairs` (`i2t`: image id -> caption ids, or `t2i`) relate an image and a caption."""
    image_index = {int(image): i for i, image in enumerate(alignment.image_ids)}
    caption_index = {int(caption): j for j, caption in enumerate(alignment.caption_ids)}
    sims = torch.zeros(len(image_index), len(caption_index))
    for query, positives in pairs.items():
        for positive in positives:
            image, caption = (query, positive) if direction == "i2t" else (positive, query)
            if caption in caption_index:  # ECCV Caption lists 2 captions that are not among the split's 25,000
                sims[image_index[image], caption_index[caption]] = 1.0
    return sims


def test_the_package_order_is_the_testall_files_order(testall_ids, annotations):
    caption_ids = annotations.align(testall_ids)
    assert len(caption_ids) == 25_000 and len(set(caption_ids.tolist())) == 25_000
    assert [annotations.metrics.coco_gts["t2i"][int(c)][0] for c in caption_ids[:10:5]] == testall_ids[:10:5]


def test_scores_that_rank_by_the_eccv_ground_truth_give_map_at_r_100(alignment, annotations):
    # ECCV Caption's two directions agree (a caption listed for an image lists the image), so one matrix ranks both.
    truth = annotations.metrics.eccv_gts
    sims = torch.maximum(pair_scores(alignment, truth["i2t"], "i2t"), pair_scores(alignment, truth["t2i"], "t2i"))
    metrics = eccv.coco_test_metrics(sims, alignment, annotations)["eccv"]
    assert {name: value for name, value in metrics.items() if name.startswith("t2i")} == {"t2i_map_at_r": 100.0, "t2i_r1": 100.0,
                                                                                          "t2i_rprecision": 100.0}
    # Two image queries list a caption outside the 25,000 (COCO images have up to 7, the split keeps 5): no ranking
    # retrieves it, so each of them reaches (n - 1) / n of its n positives at R, and 100 elsewhere.
    in_split = set(alignment.caption_ids.tolist())
    reachable = [sum(c in in_split for c in positives) / len(positives) for positives in truth["i2t"].values()]
    assert sum(share < 1 for share in reachable) == 2
    assert metrics["i2t_map_at_r"] == pytest.approx(100 * np.mean(reachable)) and metrics["i2t_rprecision"] == metrics["i2t_map_at_r"]
    assert metrics["i2t_r1"] == 100.0


def test_scores_that_rank_by_cocos_pairs_give_coco_r1_100_and_the_packages_own_eccv_figures(alignment, annotations):
    sims = pair_scores(alignment, annotations.metrics.coco_gts["i2t"], "i2t")  # 1 for COCO's pairs, 0 elsewhere
    coco = recall_metrics(sims)
    assert coco["i2t_r1"] == coco["t2i_r1"] == 100.0

    # The same ranking written out by hand (equal scores in split order), into the package's own entry point.
    images, captions = alignment.image_ids.tolist(), alignment.caption_ids.tolist()
    i2t = {image: (captions[5 * i:5 * i + 5] + captions[:5 * i] + captions[5 * i + 5:])[:48] for i, image in enumerate(images)}
    t2i = {caption: ([images[j // 5]] + images[:j // 5] + images[j // 5 + 1:])[:19] for j, caption in enumerate(captions)}
    expected = annotations.metrics.compute_all_metrics(i2t, t2i, target_metrics=("eccv_map_at_r", "eccv_rprecision", "eccv_r1", "cxc_recalls"))
    got = eccv.coco_test_metrics(sims, alignment, annotations)
    for name in ("map_at_r", "rprecision", "r1"):
        for direction in ("i2t", "t2i"):
            assert got["eccv"][f"{direction}_{name}"] == pytest.approx(100 * expected[f"eccv_{name}"][direction], abs=1e-9)
    for k in (1, 5, 10):
        for direction in ("i2t", "t2i"):
            assert got["cxc"][f"{direction}_r{k}"] == pytest.approx(100 * expected[f"cxc_r{k}"][direction], abs=1e-9)
    assert 0 < got["eccv"]["i2t_map_at_r"] < 100  # COCO's pairs miss ECCV's extra positives
    assert got["verified_misses"] == {"i2t": 0.0, "t2i": 0.0}  # no query misses


def test_ranked_lists_break_ties_in_column_order_as_a_stable_sort_does():
    scores = (torch.randn(300, 2000, generator=torch.Generator().manual_seed(0)) * 3).round()  # many equal scores, at the cut too
    scores[0, 5] = float("nan")
    expected = scores.nan_to_num(nan=float("-inf")).sort(dim=1, descending=True, stable=True).indices[:, :48]
    assert torch.equal(eccv.ranked_lists(scores, 48), expected)


def test_misses_whose_top_item_a_reannotation_verifies_are_counted_per_direction(alignment, annotations):
    """A caption query whose top image is an ECCV positive but not its COCO image is the annotation's miss, not the model's."""
    truth = annotations.metrics
    caption, positives = next((c, [i for i in images if i != truth.coco_gts["t2i"][c][0]])
                              for c, images in truth.eccv_gts["t2i"].items() if len(images) > 1)
    image = next(image for image in alignment.image_ids.tolist() if image not in truth.eccv_gts["t2i"][caption])
    t2i = {c: [truth.coco_gts["t2i"][c][0]] for c in alignment.caption_ids.tolist()}
    i2t = {i: truth.coco_gts["i2t"][i][:1] for i in alignment.image_ids.tolist()}
    t2i[caption] = [positives[0]]
    misses = eccv.verified_misses(i2t, t2i, annotations)
    assert misses.to_dict("records") == [{"direction": "t2i", "query": caption, "top": positives[0],
                                          "verified_by": "ECCV Caption" if positives[0] not in truth.cxc_gts["t2i"].get(caption, ()) else "ECCV Caption, CxC"}]
    t2i[caption] = [image]  # no re-annotation lists it
    assert eccv.verified_misses(i2t, t2i, annotations)["verified_by"].tolist() == [""]


def test_a_file_with_two_lines_swapped_is_refused_at_the_first_line_that_differs(testall_ids, annotations):
    swapped = list(testall_ids)
    swapped[7], swapped[12] = swapped[12], swapped[7]  # a caption of image 2 and one of image 3
    with pytest.raises(DataError, match=rf"^caption 8 \(line 8 of testall_caps.txt and testall_ids.txt\) is of COCO image "
                                        rf"{testall_ids[12]}, where the Karpathy 5K test order .* has image {testall_ids[7]}"):
        annotations.align(swapped)


def test_a_subset_is_refused(testall_ids, annotations):
    with pytest.raises(DataError, match=r"^ECCV Caption and CxC score COCO's whole 5K test split \(25000 captions.*this split has 24995"):
        annotations.align(testall_ids[:-5])


def test_a_karpathy_json_converted_to_testall_keeps_the_order(tmp_path, testall_ids, annotations):
    """Karpathy's JSON numbers images by position; their COCO ids come from COCO's file names."""
    captions = (COCO_FIXTURES / "testall_caps.txt").read_text().splitlines()
    images = [{"filepath": "val2014", "filename": f"COCO_val2014_{image:012d}.jpg", "split": "test", "cocoid": image,
               "sentences": [{"raw": text} for text in captions[5 * i:5 * i + 5]]} for i, image in enumerate(testall_ids[::5])]
    (tmp_path / "dataset_coco.json").write_text(json.dumps({"images": images}))
    raw = read_karpathy(tmp_path / "dataset_coco.json", "coco")
    write_caption_splits(raw, tmp_path / "coco")
    ids = [int(line) for line in (tmp_path / "coco" / "testall_ids.txt").read_text().split()]
    mapping = json.loads((tmp_path / "coco" / "id_mapping.json").read_text())
    assert ids[:6] == [0, 0, 0, 0, 0, 1]  # positions, not COCO ids
    coco_ids = eccv.coco_image_ids(ids, [mapping[str(i)] for i in ids])
    assert np.array_equal(annotations.align(coco_ids), annotations.align(testall_ids))


def test_an_evaluated_coco_run_reports_eccv_and_cxc_in_its_metrics_and_mlflow(tmp_path, monkeypatch, testall_ids, capsys):
    """The prepare and evaluate stages on the real testall files with stand-in images (the embeddings stand in for a model)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "coco").mkdir()
    for name in ("testall_caps.txt", "testall_ids.txt"):
        (tmp_path / "coco" / name).write_bytes((COCO_FIXTURES / name).read_bytes())
    (tmp_path / "images").mkdir()
    pixel = np.zeros((8, 8, 3), dtype=np.uint8)
    names = {str(image): f"COCO_val2014_{image:012d}.jpg" for image in testall_ids[::5]}
    for name in names.values():
        cv2.imwrite(str(tmp_path / "images" / name), pixel)
    (tmp_path / "coco" / "id_mapping.json").write_text(json.dumps(names))
    overrides = ["data.dataset=coco", f"data.root={tmp_path / 'coco'}", f"data.images={tmp_path / 'images'}", "data.cache_res=8",
                 "data.img_res=8", "embed.split=testall", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", "data.dev_images=0"]
    config = load_config(REPO / "params.yaml", overrides)
    pipeline.prepare(config)

    split = PreparedSplit.load(tmp_path / "data" / "prepared" / "coco", "testall")
    annotations, alignment = coco_test_alignment(split, "")
    generator = torch.Generator().manual_seed(0)  # one view, one block: scoring 5000 x 25000 stays cheap
    images, captions = torch.randn(5000, 16, generator=generator), torch.randn(25_000, 16, generator=generator)
    (tmp_path / "embeddings" / "testall").mkdir(parents=True)
    torch.save({"embeddings": images, "image_ids": torch.from_numpy(split.image_ids)}, tmp_path / "embeddings" / "testall" / "images.pt")
    torch.save({"embeddings": captions, "caption_image": torch.from_numpy(split.caption_image)},
               tmp_path / "embeddings" / "testall" / "captions.pt")
    (tmp_path / "embeddings" / "testall" / "meta.json").write_text(json.dumps({"block_dim": 16, "matching": "max", "dustbin": 1.0,
                                                                              "sinkhorn_iters": 0}))
    tracker = Tracker(config.tracking)
    run_id = tracker.start(None, run_name="coco-stand-in", params={}, tags={})
    tracker.finish()
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "run.json").write_text(json.dumps({"run_id": run_id, "model_id": None}))

    pipeline.evaluate(config)
    reported = json.loads((tmp_path / "metrics" / "eval.json").read_text())
    assert set(reported) == {"5fold1k", "5k", "eccv", "cxc", "verified_misses"}
    assert set(reported["eccv"]) == {f"{d}_{m}" for d in ("i2t", "t2i") for m in ("map_at_r", "r1", "rprecision")}
    expected = eccv.coco_test_metrics(score(Embeddings.load(tmp_path / "embeddings" / "testall"), 256), alignment, annotations)
    assert reported["cxc"]["t2i_r5"] == pytest.approx(expected["cxc"]["t2i_r5"], abs=1e-4)
    logged = mlflow_client(tmp_path).get_run(run_id).data.metrics
    assert logged["testall_eccv_i2t_map_at_r"] == pytest.approx(expected["eccv"]["i2t_map_at_r"])
    assert {"testall_cxc_t2i_r10", "testall_verified_misses_i2t", "testall_5k_rsum"} <= set(logged)
    out = capsys.readouterr().out
    assert "ECCV Caption       map_at_r" in out and "PMRP            not computed: set eval.pm_gt_dir" in out

    # The failure notebook's account of the same misses: the logged shares, and a figure of a few.
    misses = failures.coco_verified_misses(tmp_path, config)
    assert eccv.verified_shares(misses) == pytest.approx({d: logged[f"testall_verified_misses_{d}"] for d in ("i2t", "t2i")})
    assert set(misses["verified_by"]) <= {"", "ECCV Caption", "CxC", "ECCV Caption, CxC"} and (misses["verified_by"] != "").any()
    first = misses.iloc[0]
    top_image = first["top"] if first["direction"] == "t2i" else None
    assert top_image is None or split.image_ids[first["top_index"]] == top_image
    shown = misses.groupby("direction").head(1)
    figure = failures.verified_miss_figure(shown, failures.SplitImages(failures.load_split(tmp_path, config), 8, "stretch"))
    assert len(figure.subfigs) == len(shown) == 2



def test_pmrp_is_reported_from_the_packages_extra_files_and_a_folder_without_them_is_refused(tmp_path, alignment, annotations):
    """PMRP is the R-Precision of the plausible-match ground truth: given ECCV Caption's pairs as that ground truth, it
    is ECCV Caption's R-Precision."""
    truth = annotations.metrics.eccv_gts
    for direction, name in (("i2t", "pm_image_to_caption.json"), ("t2i", "pm_caption_to_image.json")):
        (tmp_path / name).write_text(json.dumps({str(k): v for k, v in truth[direction].items()}))
    with_pm = eccv.CocoTestAnnotations(tmp_path)
    images, captions = alignment.image_ids.tolist(), alignment.caption_ids.tolist()
    i2t = {image: captions[5 * i:5 * i + 48] + captions[:48] for i, image in enumerate(images)}
    t2i = {caption: [images[j // 5]] + images[:19] for j, caption in enumerate(captions)}
    scores = with_pm.scores(i2t, t2i)
    assert scores["pmrp"] == {f"{d}_pmrp": scores["eccv"][f"{d}_rprecision"] for d in ("i2t", "t2i")}
    (tmp_path / "pm_caption_to_image.json").unlink()
    with pytest.raises(ConfigError, match=rf"^eval.pm_gt_dir: {tmp_path} has no pm_caption_to_image.json"):
        eccv.CocoTestAnnotations(tmp_path)
