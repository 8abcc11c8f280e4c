"""The analysis functions behind the notebooks, on small hand-made inputs."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.colors import to_rgba
from mlflow.tracking import MlflowClient

from avse.analysis import failures, runs
from avse.analysis.project import find_project, project_file
from avse.config import from_dict
from avse.data.dataset import PreparedSplit
from avse.errors import AvseError
from avse.evaluation.evaluate import Embeddings
from avse.model.avse import build_model
from avse.model.sampling import keep_count, radial_bias_indices, view_centres
from avse.model.similarity import meta_similarity
from test_compare import log_run

CONFIG = from_dict({})  # the defaults: synthetic dataset, test split, sqlite:///mlflow.db


# --- finding the project and its outputs ---------------------------------------------------


def test_the_project_is_avse_project_else_the_nearest_folder_with_dvc_yaml(tmp_path):
    project = tmp_path / "project"
    (project / "notebooks").mkdir(parents=True)
    (project / "dvc.yaml").write_text("stages: {}\n")
    assert find_project(project / "notebooks", environ={}) == project
    assert find_project(tmp_path, environ={"AVSE_PROJECT": str(project)}) == project
    with pytest.raises(AvseError, match=rf"^AVSE_PROJECT={tmp_path}: no dvc.yaml there \(expected the project folder\)$"):
        find_project(project, environ={"AVSE_PROJECT": str(tmp_path)})
    (tmp_path / "elsewhere").mkdir()
    with pytest.raises(AvseError, match=r"elsewhere: no dvc.yaml here or above; set AVSE_PROJECT to the project folder$"):
        find_project(tmp_path / "elsewhere", environ={})


@pytest.mark.parametrize("load, message", [
    (lambda project: failures.load_per_query(project, "t2i"), "outputs/eval/t2i.csv not found: run `dvc repro` (evaluate stage) first"),
    (lambda project: failures.load_per_query(project, "i2t"), "outputs/eval/i2t.csv not found: run `dvc repro` (evaluate stage) first"),
    (failures.load_eval_metrics, "metrics/eval.json not found: run `dvc repro` (evaluate stage) first"),
    (lambda project: failures.load_embeddings(project, CONFIG), "embeddings/test not found: run `dvc repro` (embed stage) first"),
    (lambda project: failures.load_split(project, CONFIG), "data/prepared/synthetic/test.csv not found: run `dvc repro` (prepare stage) first"),
    (lambda project: failures.load_caption_mentions(project, CONFIG), "data/synthetic/scenes.jsonl not found: run `dvc repro` (synthesize stage) first"),
    (lambda project: runs.project_tracking_uri(project, CONFIG), "mlflow.db not found: run `dvc repro` (train stage) first"),
])
def test_a_missing_output_names_the_file_and_the_stage_that_writes_it(tmp_path, load, message):
    with pytest.raises(AvseError) as error:
        load(tmp_path)
    assert str(error.value) == message


def test_outputs_are_read_as_written(tmp_path):
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "eval.json").write_text(json.dumps({"1k": {"rsum": 20.5}}))
    assert failures.load_eval_metrics(tmp_path) == {"1k": {"rsum": 20.5}}
    (tmp_path / "outputs" / "eval").mkdir(parents=True)
    (tmp_path / "outputs" / "eval" / "t2i.csv").write_text("caption_index,caption,rank\n0,nan,3\n1,a red circle,0\n")
    assert failures.load_per_query(tmp_path, "t2i").to_dict("list") == {"caption_index": [0, 1], "caption": ["nan", "a red circle"], "rank": [3, 0]}
    prepared = tmp_path / "data" / "prepared" / "synthetic"
    prepared.mkdir(parents=True)
    (prepared / "test.csv").write_text("image_id,image_file,image_path,caption\n7,a.jpg,data/images/a.jpg,one\n7,a.jpg,data/images/a.jpg,two\n")
    split = failures.load_split(tmp_path, CONFIG)
    assert split.image_paths == [str(tmp_path / "data" / "images" / "a.jpg")] and split.captions == ["one", "two"]
    assert project_file(tmp_path, "data/prepared/synthetic/test.csv", "prepare") == prepared / "test.csv"


# --- recall tables ----------------------------------------------------------------------------


def test_recall_summary_is_one_row_per_protocol_in_a_fixed_column_order():
    metrics = {name: float(i) for i, name in enumerate(failures.SUMMARY_COLUMNS + ["i2t_meanr", "t2i_meanr"])}
    table = failures.recall_summary({"5fold1k": metrics, "5k": {k: v + 100 for k, v in metrics.items()}})
    assert table.index.tolist() == ["5fold1k", "5k"] and table.index.name == "protocol"
    assert table.columns.tolist() == failures.SUMMARY_COLUMNS
    assert table.loc["5k"].tolist() == [100.0 + i for i in range(9)]


T2I = pd.DataFrame({
    "caption_index": [0, 1, 2, 3],
    "caption": ["a small red circle and a large blue square", "there is a small red circle, a large blue square and a small white cross", "a small blue square left of a small red circle", "a large red cross and a small red circle"],
    "image_id": [10, 10, 11, 11],
    "image_path": ["data/img/test_0.jpg", "data/img/test_0.jpg", "data/img/test_1.jpg", "data/img/test_1.jpg"],
    "rank": [3, 0, 7, 3],
    "top1_image_id": [12, 10, 10, 12], "top1_score": [0.9, 0.8, 0.7, 0.6],
    "top2_image_id": [11, 12, 12, 10], "top2_score": [0.5, 0.4, 0.3, 0.2],
})


def test_worst_queries_rank_highest_first_and_keep_file_order_among_ties():
    assert failures.worst_queries(T2I, 3)["caption_index"].tolist() == [2, 0, 3]
    assert failures.top_hits(T2I.iloc[3], "image_id") == [12, 10] and failures.top_hits(T2I.iloc[3], "score") == [0.6, 0.2]


def test_recall_by_caption_length():
    table = failures.recall_by(T2I, failures.caption_words(T2I), ks=(1, 5))
    assert table.index.name == "words" and table.index.tolist() == [9, 10, 15]
    assert table.columns.tolist() == ["queries", "r1", "r5", "mean_rank"]
    assert table.loc[9].tolist() == [2, 0.0, 100.0, 4.0]  # ranks 3 and 3
    assert table.loc[10].tolist() == [1, 0.0, 0.0, 8.0]
    assert table.loc[15].tolist() == [1, 100.0, 100.0, 1.0]


def test_recall_by_a_list_column_counts_a_query_in_each_of_its_items():
    per_query = pd.DataFrame({"rank": [0, 4, 20], "shapes": [["circle"], ["circle", "square"], ["square"]]})
    table = failures.recall_by(per_query, "shapes")
    assert table.to_dict("index") == {
        "circle": {"queries": 2, "r1": 50.0, "r5": 100.0, "r10": 100.0, "mean_rank": 3.0},
        "square": {"queries": 2, "r1": 0.0, "r5": 50.0, "r10": 50.0, "mean_rank": 13.0},
    }
    figure = failures.recall_by_figure(table, "recall by shape")
    ax = figure.axes[0]
    assert [label.get_text() for label in ax.get_xticklabels()] == ["circle\n(2)", "square\n(2)"]
    assert [bar.get_height() for bar in ax.patches] == [50.0, 0.0, 100.0, 50.0, 100.0, 50.0]  # R@1 bars, R@5, R@10
    assert ax.get_title() == "recall by shape"


# --- what synthetic captions mention --------------------------------------------------------


def scene(file, split, objects, captions):
    keys = ("shape", "colour", "size")
    return {"file": file, "split": split, "objects": [dict(zip(keys, obj)) for obj in objects],
            "captions": [{"text": text, "objects": mentioned} for text, mentioned in captions]}


def write_scenes(path):
    scenes = [
        scene("train_0.jpg", "train", [("circle", "red", "small")] * 3, [("a small red circle and a large blue square", [0, 1])]),
        scene("test_0.jpg", "test", [("circle", "red", "small"), ("square", "blue", "large"), ("cross", "white", "small")],
              [("a small red circle and a large blue square", [0, 1]), ("there is a small red circle, a large blue square and a small white cross", [0, 1, 2])]),
        scene("test_1.jpg", "test", [("cross", "red", "large"), ("circle", "red", "small"), ("square", "blue", "small")],
              [("a small blue square left of a small red circle", [2, 1]), ("a large red cross and a small red circle", [0, 1])]),
    ]
    path.write_text("".join(json.dumps(s) + "\n" for s in scenes))
    return path


def test_caption_mentions_are_read_from_the_scene_metadata(tmp_path):
    mentions = failures.caption_mentions(write_scenes(tmp_path / "scenes.jsonl"), "test")
    assert mentions.columns.tolist() == failures.MENTION_COLUMNS
    assert mentions.to_dict("records") == [
        {"image_file": "test_0.jpg", "caption": "a small red circle and a large blue square", "objects": 2, "relation": "none",
         "shapes": ["circle", "square"], "colours": ["red", "blue"], "sizes": ["small", "large"]},
        {"image_file": "test_0.jpg", "caption": "there is a small red circle, a large blue square and a small white cross", "objects": 3, "relation": "none",
         "shapes": ["circle", "square", "cross"], "colours": ["red", "blue", "white"], "sizes": ["small", "large", "small"]},
        {"image_file": "test_1.jpg", "caption": "a small blue square left of a small red circle", "objects": 2, "relation": "left of",
         "shapes": ["square", "circle"], "colours": ["blue", "red"], "sizes": ["small", "small"]},
        {"image_file": "test_1.jpg", "caption": "a large red cross and a small red circle", "objects": 2, "relation": "none",
         "shapes": ["cross", "circle"], "colours": ["red", "red"], "sizes": ["large", "small"]},
    ]
    merged = failures.with_mentions(T2I, mentions)
    assert merged["objects"].tolist() == [2, 3, 2, 2] and merged["relation"].tolist() == ["none", "none", "left of", "none"]
    assert failures.recall_by(merged, "objects", ks=(1,))["r1"].to_dict() == {2: 0.0, 3: 100.0}
    assert failures.recall_by(merged, "sizes", ks=(1,))["queries"].to_dict() == {"large": 3, "small": 6}
    stale = T2I.assign(caption=T2I["caption"].replace("a large red cross and a small red circle", "a large red star"))
    with pytest.raises(AvseError, match=r"^scenes.jsonl: no caption 'a large red star' of test_1.jpg: the outputs are stale, run `dvc repro`$"):
        failures.with_mentions(stale, mentions)


# --- scores -----------------------------------------------------------------------------------


def test_positive_and_hardest_negative_per_query():
    sims = torch.tensor([
        [0.9, 0.2, 0.5, 0.3],  # image 0 owns captions 0 and 1
        [0.1, 0.6, 0.4, 0.8],  # image 1 owns captions 2 and 3
    ])
    scores = failures.positive_and_hardest_negative(sims, captions_per_image=2)
    assert scores["direction"].tolist() == ["t2i"] * 4 + ["i2t"] * 2
    assert scores["query"].tolist() == [0, 1, 2, 3, 0, 1]
    assert scores["positive"].tolist() == pytest.approx([0.9, 0.2, 0.4, 0.8, 0.9, 0.8])
    assert scores["hardest_negative"].tolist() == pytest.approx([0.1, 0.6, 0.5, 0.3, 0.5, 0.6])
    figure = failures.score_histogram(scores, bins=5)
    assert [ax.get_title() for ax in figure.axes] == ["t2i: hardest negative wins for 50.0%", "i2t: hardest negative wins for 0.0%"]
    assert [len(ax.patches) for ax in figure.axes] == [10, 10]  # positive and hardest-negative bars


# --- block matching and views -----------------------------------------------------------------


def test_block_cosines_of_one_pair_and_their_maxima_sum_to_the_max_matching_score():
    image = torch.tensor([1.0, 0.0, 0.0, 2.0, 3.0, 4.0])  # three blocks of 2
    caption = torch.tensor([1.0, 1.0, 0.0, -1.0])  # two blocks
    cosines = failures.block_cosines(image, caption, block_dim=2)
    root_half = 2 ** -0.5
    assert cosines == pytest.approx(np.array([[root_half, root_half, 1.4 * root_half], [0.0, -1.0, -0.8]]), abs=1e-6)
    assert cosines.max(axis=1).sum() == pytest.approx(float(meta_similarity(image[None], caption[None], 2)))


def embeddings(n_images=3, views=2, block_dim=2, text_blocks=2):
    generator = torch.Generator().manual_seed(0)
    return Embeddings(
        images=torch.randn(n_images, views * text_blocks * block_dim, generator=generator),
        image_ids=torch.tensor([10, 11, 12]), captions=torch.randn(4, text_blocks * block_dim, generator=generator),
        caption_image=torch.tensor([0, 0, 1, 1]), meta={"block_dim": block_dim, "views": views},
    )


def test_query_block_matches_compare_the_ground_truth_with_the_top_image():
    embedded = embeddings()
    matches = failures.query_block_matches(embedded, T2I.iloc[3])  # caption 3 of image 11, top-1 image 12
    assert list(matches) == ["ground truth 11", "top-1 12"]
    assert matches["top-1 12"] == pytest.approx(failures.block_cosines(embedded.images[2], embedded.captions[3], 2))
    assert matches["ground truth 11"].shape == (2, 4)
    assert list(failures.query_block_matches(embedded, T2I.iloc[1])) == ["ground truth 10"]  # retrieved first

    cosines = np.array([[0.1, 0.9, 0.2, 0.3], [0.5, 0.0, 0.4, 0.6]])
    figure = failures.block_match_figure({"pair": cosines}, views=2, caption="a red cross")
    ax = figure.axes[0]
    assert [patch.get_xy() for patch in ax.patches] == [(0.5, -0.5), (2.5, 0.5)]  # the boxes: columns 1 and 3
    assert [label.get_text() for label in ax.get_xticklabels()] == ["v0.0", "v0.1", "v1.0", "v1.1"]
    assert ax.get_title() == "pair\nmax-matching score 1.500"


def test_patch_masks_mark_the_kept_patches():
    masks = failures.patch_masks(torch.tensor([[0, 1, 3], [1, 2, 3]]), grid=2)
    assert masks.tolist() == [[[True, True], [False, True]], [[False, True], [True, True]]]


def test_evaluation_view_masks_are_the_models_deterministic_views():
    config = from_dict({"data": {"img_res": 32}, "model": {"vision": {"name": "vit-tiny"}, "embed_size": 32, "block_dim": 16, "views": 3, "eval_keep_ratio": 0.5}})
    model = build_model(config, vocab_size=100).train()
    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    grid = 32 // 8  # vit-tiny's 8 px patches
    masks = failures.evaluation_view_masks(model, image)
    assert model.training  # the model's mode is restored
    keep = keep_count(0.5, grid, grid)
    expected = radial_bias_indices(view_centres(1, 3, grid, grid, train=False), grid, grid, keep, noise=False)[0]
    assert masks.shape == (3, grid, grid) and masks.sum(axis=(1, 2)).tolist() == [keep] * 3
    assert np.array_equal(masks, failures.patch_masks(expected, grid))
    figure = failures.view_mask_figure(image, masks)
    assert [ax.get_title() for ax in figure.axes] == [f"view {v}: 8 of 16 patches" for v in range(3)]
    assert [len(ax.images) for ax in figure.axes] == [2, 2, 2]  # the image and the shade of dropped patches


# --- failure grids ----------------------------------------------------------------------------


@pytest.fixture
def split_images(tmp_path):
    """Three 4 px images of one grey level each (10, 20, 30), ids 10, 11, 12, two captions each."""
    cache = tmp_path / "test_images.npy"
    np.save(cache, np.stack([np.full((4, 4, 3), level, dtype=np.uint8) for level in (10, 20, 30)]))
    split = PreparedSplit(
        name="test", captions=["a red circle", "a small red circle", "a blue square left of a red circle", "a red cross", "x", "y"],
        caption_image=np.array([0, 0, 1, 1, 2, 2]), image_ids=np.array([10, 11, 12]),
        image_paths=["data/img/test_0.jpg", "data/img/test_1.jpg", "data/img/test_2.jpg"], cache=cache,
    )
    return failures.SplitImages(split, 4, "stretch")


def test_split_images_by_id(split_images):
    assert split_images[12][0, 0].tolist() == [30, 30, 30]
    with pytest.raises(AvseError, match=r"^image id 13 is not in the prepared test split: the outputs are stale, run `dvc repro`$"):
        split_images[13]


def test_t2i_failure_grid(split_images):
    figure = failures.t2i_failure_figure(failures.worst_queries(T2I, 4), split_images)
    assert [subfigure.get_suptitle() for subfigure in figure.subfigs] == [
        '"a small blue square left of a small red circle"', '"a small red circle and a large blue square"',
        '"a large red cross and a small red circle"', '"there is a small red circle, a large blue square and a small white cross"']
    axes = figure.subfigs[0].axes
    assert [ax.get_title() for ax in axes] == ["truth: rank 8", "#1  0.700", "#2  0.300"]
    assert [int(ax.images[0].get_array()[0, 0, 0]) for ax in axes] == [20, 10, 30]
    # Only the last query retrieved its own image (image 10, first): that panel alone is framed green.
    framed = [[ax.spines["top"].get_edgecolor() == to_rgba(failures.HIT_COLOUR) for ax in subfigure.axes] for subfigure in figure.subfigs]
    assert framed == [[False, False, False]] * 3 + [[False, True, False]]


def test_i2t_failure_grid(split_images):
    i2t = pd.DataFrame({
        "image_index": [1], "image_id": [11], "image_path": ["data/img/test_1.jpg"], "rank": [1],
        "top1_caption_index": [0], "top1_caption": ["a red circle"], "top1_score": [0.91],
        "top2_caption_index": [3], "top2_caption": ["a red cross"], "top2_score": [0.9],
    })
    figure = failures.i2t_failure_figure(i2t, split_images)
    image_ax, text_ax = figure.subfigs[0].axes
    assert image_ax.get_title() == "test_1.jpg: rank 2" and int(image_ax.images[0].get_array()[0, 0, 0]) == 20
    assert text_ax.texts[0].get_text().splitlines() == [
        "its captions:", "    a blue square left of a red circle", "    a red cross",
        "retrieved:", "  #1 0.910  a red circle", "+ #2 0.900  a red cross",
    ]


# --- tracked runs -----------------------------------------------------------------------------


COMPARISON = pd.DataFrame({
    "run_id": ["a", "b", "c", "d"], "run_name": ["a", "b", "c", "d"],
    "dataset": ["f30k", "f30k", "f30k", "coco"], "views": [2, 2, 1, 2],
    "rsum": [400.0, 420.0, None, 300.0], "i2t_r1": [60.0, 70.0, None, 40.0], "t2i_r1": [40.0, 50.0, None, 30.0],
})


def test_ablation_table_groups_runs_by_dataset_and_setting():
    table = runs.ablation_table(COMPARISON, "views")
    assert table.index.tolist() == [("coco", 2), ("f30k", 1), ("f30k", 2)]
    assert table.columns.tolist() == ["runs", "rsum", "i2t_r1", "t2i_r1"]
    assert table.loc[("f30k", 2)].tolist() == [2, 410.0, 65.0, 45.0]
    assert table.loc[("f30k", 1), "runs"] == 1 and pd.isna(table.loc[("f30k", 1), "rsum"])  # not evaluated
    ax = runs.ablation_figure(table).axes[0]
    assert [label.get_text() for label in ax.get_xticklabels()] == ["coco: 2\n(1 runs)", "f30k: 1\n(1 runs)", "f30k: 2\n(2 runs)"]
    assert [bar.get_height() for bar in ax.patches][::2] == [300.0, 410.0] and ax.get_title() == "rsum by views"
    single = runs.ablation_figure(runs.ablation_table(COMPARISON[COMPARISON["dataset"] == "f30k"], "views"), "i2t_r1").axes[0]
    assert [label.get_text() for label in single.get_xticklabels()] == ["1\n(1 runs)", "2\n(2 runs)"]


def test_runs_and_training_curves_from_the_projects_store(tmp_path):
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment_id = client.create_experiment("avse", artifact_location=str(tmp_path / "artifacts"))
    with pytest.raises(AvseError, match=r"^no runs in experiment 'avse' at sqlite:///mlflow.db$"):
        runs.project_runs(tmp_path, CONFIG)
    run_id = log_run(client, experiment_id, "tiny", {"data.img_res": 32, "model.views": 2}, {"dataset": "synthetic"}, {"test_1k_rsum": 300.0})
    for step, loss in [(4, 2.0), (2, 3.0)]:
        client.log_metric(run_id, "loss", loss, step=step)
    client.log_metric(run_id, "dev_rsum", 250.0, step=4)
    table = runs.project_runs(tmp_path, CONFIG)
    assert table[["run_name", "resolution", "views", "rsum"]].values.tolist() == [["tiny", 32, 2, 300.0]]
    histories = runs.metric_histories(runs.project_tracking_uri(tmp_path, CONFIG), table)
    assert histories.values.tolist() == [[run_id, "tiny", "loss", 2, 3.0], [run_id, "tiny", "loss", 4, 2.0], [run_id, "tiny", "dev_rsum", 4, 250.0]]
    figure = runs.training_curves_figure(histories)
    assert [ax.get_title() for ax in figure.axes] == ["loss", "dev_rsum"]
    loss_line = figure.axes[0].lines[0]
    assert loss_line.get_xdata().tolist() == [2, 4] and loss_line.get_ydata().tolist() == [3.0, 2.0]
    assert loss_line.get_label() == f"tiny ({run_id[:8]})"
