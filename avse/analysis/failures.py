"""Failure analysis of an evaluation: the evaluate stage's outputs as tables and figures.

What it reads, all written by the pipeline (nothing is re-encoded):
    metrics/eval.json           {protocol: {metric: value}}
    outputs/eval/t2i.csv        one row per caption: caption_index, caption, image_id, image_path,
                                rank, then top{k}_image_id, top{k}_score for k = 1..5
    outputs/eval/i2t.csv        one row per image: image_index, image_id, image_path, rank,
                                then top{k}_caption_index, top{k}_caption, top{k}_score
    embeddings/<split>/         image and caption embeddings (scores, block matches)
    data/prepared/<dataset>/    the split's captions and images
    data/synthetic/scenes.jsonl the objects of each synthetic scene and those each caption mentions

Ranks are 0-based as in the CSVs: rank 0 is a hit at R@1.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from torch import Tensor

from avse.analysis.project import project_file
from avse.config import Config
from avse.data.dataset import ImageSource, PreparedSplit, to_tensor
from avse.data.images import Resize
from avse.data.prepare import prepared_dir
from avse.data.synthetic import RELATIONS
from avse.errors import AvseError
from avse.evaluation.diagnostics import choice_diagnostics, chosen_blocks, distinct_per_caption, view_cosines
from avse.evaluation import eccv
from avse.evaluation.evaluate import Embeddings, coco_test_alignment, score
from avse.evaluation.recall import RECALL_KS
from avse.model.avse import AVSE
from avse.model.similarity import meta_similarity
from avse.pipeline import EMBEDDINGS, EVAL_METRICS, EVAL_OUTPUTS

SUMMARY_COLUMNS = ["i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum", "i2t_medr", "t2i_medr"]
MENTION_COLUMNS = ["image_file", "caption", "objects", "relation", "shapes", "colours", "sizes"]
SCENES_FILE = "scenes.jsonl"
HIT_COLOUR = "tab:green"


def load_eval_metrics(project: Path) -> dict[str, dict[str, float]]:
    """`metrics/eval.json`: metrics by protocol."""
    return json.loads(project_file(project, EVAL_METRICS, "evaluate").read_text())


def load_per_query(project: Path, direction: Literal["t2i", "i2t"]) -> pd.DataFrame:
    """`outputs/eval/<direction>.csv`, one row per query (columns in the module docstring)."""
    # Captions are text even when they read "nan" or "null".
    return pd.read_csv(project_file(project, EVAL_OUTPUTS / f"{direction}.csv", "evaluate"), keep_default_na=False)


def load_split(project: Path, config: Config) -> PreparedSplit:
    """The evaluated split (`embed.split`) of the prepared dataset, with image paths anchored at the project."""
    index = project_file(project, prepared_dir(config) / f"{config.embed.split}.csv", "prepare")
    split = PreparedSplit.load(index.parent, config.embed.split)
    return dataclasses.replace(split, image_paths=[str(project / path) for path in split.image_paths])


def load_embeddings(project: Path, config: Config) -> Embeddings:
    """`embeddings/<embed.split>/` as the embed stage saved it."""
    return Embeddings.load(project_file(project, EMBEDDINGS / config.embed.split, "embed"))


class SplitImages:
    """Images of a prepared split by image id, `[R, R, 3]` uint8 at `resolution`, made square per `resize` (`data.resize`)."""

    def __init__(self, split: PreparedSplit, resolution: int, resize: Resize):
        self.split, self.source = split, ImageSource(split, resolution, resize)
        self._positions = {int(image_id): position for position, image_id in enumerate(split.image_ids)}

    def __getitem__(self, image_id: int) -> np.ndarray:
        if int(image_id) not in self._positions:
            raise AvseError(f"image id {image_id} is not in the prepared {self.split.name} split: the outputs are stale, run `dvc repro`")
        return self.source[self._positions[int(image_id)]]


def recall_summary(metrics: Mapping[str, Mapping[str, float]]) -> pd.DataFrame:
    """R@K, rsum and median ranks: `[protocols, 9]`, one row per protocol."""
    return pd.DataFrame.from_dict(metrics, orient="index")[SUMMARY_COLUMNS].rename_axis("protocol")


def worst_queries(per_query: pd.DataFrame, n: int) -> pd.DataFrame:
    """The `n` queries ranked worst (highest rank), ties in file order."""
    return per_query.sort_values("rank", ascending=False, kind="stable").head(n)


def top_hits(query: pd.Series, field: str) -> list:
    """`top1_<field>`, `top2_<field>`, ... of one per-query row, in rank order."""
    k = sum(1 for name in query.index if re.fullmatch(rf"top\d+_{field}", name))
    return [query[f"top{place}_{field}"] for place in range(1, k + 1)]


def captions_of(split: PreparedSplit, position: int) -> list[str]:
    """The captions of the image at `position`, in split order."""
    return [caption for caption, owner in zip(split.captions, split.caption_image) if owner == position]


def _show_image(ax: Axes, image: np.ndarray, title: str, frame: str | None = None) -> None:
    ax.imshow(image)
    ax.set_title(title, fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_edgecolor(frame or "none")
        spine.set_linewidth(3)


def t2i_failure_figure(failures: pd.DataFrame, images: SplitImages) -> Figure:
    """One row per caption query (rows of `t2i.csv`): the caption over its ground-truth image and the
    retrieved top-k with their scores; a retrieved ground truth is framed in green."""
    k = len(top_hits(failures.iloc[0], "score"))
    figure = Figure(figsize=(1.6 * (k + 1), 2.2 * len(failures)), layout="constrained")
    for subfigure, (_, query) in zip(figure.subfigures(len(failures), 1, squeeze=False)[:, 0], failures.iterrows()):
        subfigure.suptitle(f'"{query["caption"]}"', fontsize=9)
        axes = subfigure.subplots(1, k + 1, squeeze=False)[0]
        _show_image(axes[0], images[query["image_id"]], f"truth: rank {query['rank'] + 1}", frame="black")
        hits = zip(axes[1:], top_hits(query, "image_id"), top_hits(query, "score"))
        for place, (ax, image_id, score) in enumerate(hits, start=1):
            _show_image(ax, images[image_id], f"#{place}  {score:.3f}", frame=HIT_COLOUR if image_id == query["image_id"] else None)
    return figure


def i2t_failure_figure(failures: pd.DataFrame, images: SplitImages) -> Figure:
    """One row per image query (rows of `i2t.csv`): the image, its own captions, and the retrieved
    top-k captions with their scores, its own ones marked `+`."""
    split = images.split
    figure = Figure(figsize=(9, 2.0 * len(failures)), layout="constrained")
    for subfigure, (_, query) in zip(figure.subfigures(len(failures), 1, squeeze=False)[:, 0], failures.iterrows()):
        image_ax, text_ax = subfigure.subplots(1, 2, width_ratios=[1, 5])
        _show_image(image_ax, images[query["image_id"]], f"{Path(query['image_path']).name}: rank {query['rank'] + 1}", frame="black")
        position = query["image_index"]
        retrieved = [
            f"{'+' if split.caption_image[caption_index] == position else ' '} #{place} {score:.3f}  {caption}"
            for place, (caption_index, caption, score) in enumerate(
                zip(top_hits(query, "caption_index"), top_hits(query, "caption"), top_hits(query, "score")), start=1)
        ]
        lines = ["its captions:", *(f"    {caption}" for caption in captions_of(split, position)), "retrieved:", *retrieved]
        text_ax.text(0, 1, "\n".join(lines), va="top", family="monospace", fontsize=8)
        text_ax.axis("off")
    return figure


def caption_words(per_query: pd.DataFrame) -> pd.Series:
    """Words per caption, named `words` (to group recall by caption length)."""
    return per_query["caption"].str.split().str.len().rename("words")


def recall_by(per_query: pd.DataFrame, by: str | pd.Series, ks: Sequence[int] = RECALL_KS) -> pd.DataFrame:
    """Recall of the queries grouped by a column or a Series aligned with `per_query`:
    `[groups, 2 + len(ks)]` with `queries`, `r<k>` (percent) and `mean_rank` (1-based).
    A group value that is a list counts the query in each of its items (a caption naming
    a circle and a square counts for both shapes)."""
    groups = per_query[by] if isinstance(by, str) else by
    table = pd.DataFrame({"group": groups, "rank": per_query["rank"]}).explode("group")
    recalls = [f"r{k}" for k in ks]
    for k, column in zip(ks, recalls):
        table[column] = 100.0 * (table["rank"] < k)
    grouped = table.groupby("group", sort=True)
    result = grouped[recalls].mean()
    result.insert(0, "queries", grouped.size())
    result["mean_rank"] = grouped["rank"].mean() + 1.0
    return result.rename_axis(groups.name)


def recall_by_figure(table: pd.DataFrame, title: str) -> Figure:
    """Bars of R@K per group of a :func:`recall_by` table, with each group's query count."""
    ks = [column for column in table.columns if re.fullmatch(r"r\d+", column)]
    figure = Figure(figsize=(max(4.0, 0.9 * len(table) + 2), 3.2), layout="constrained")
    ax = figure.subplots()
    width = 0.8 / len(ks)
    positions = np.arange(len(table))
    for offset, column in enumerate(ks):
        ax.bar(positions + (offset - (len(ks) - 1) / 2) * width, table[column], width, label=f"R@{column[1:]}")
    ax.set_xticks(positions, [f"{value}\n({count})" for value, count in zip(table.index, table["queries"])], fontsize=8)
    ax.set(xlabel=f"{table.index.name} (queries)", ylabel="recall (%)", title=title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return figure


def load_caption_mentions(project: Path, config: Config) -> pd.DataFrame:
    """:func:`caption_mentions` of the evaluated split, from the synthetic dataset's `scenes.jsonl`."""
    return caption_mentions(project_file(project, Path(config.data.root) / SCENES_FILE, "synthesize"), config.embed.split)


def caption_mentions(scenes: Path, split: str) -> pd.DataFrame:
    """What each caption of `split` mentions, one row per caption (`[n_captions, 7]`): `image_file`,
    `caption`, `objects` (how many), `relation` ("left of", ... or "none" for a list of objects),
    and `shapes`, `colours` and `sizes` (lists, in order of mention)."""
    rows = []
    for line in scenes.read_text(encoding="utf-8").splitlines():
        scene = json.loads(line)
        if scene["split"] != split:
            continue
        for caption in scene["captions"]:
            mentioned = [scene["objects"][index] for index in caption["objects"]]
            relation = next((r for r in RELATIONS if f" {r} " in caption["text"]), "none")
            rows.append({
                "image_file": scene["file"], "caption": caption["text"], "objects": len(mentioned), "relation": relation,
                "shapes": [obj["shape"] for obj in mentioned], "colours": [obj["colour"] for obj in mentioned],
                "sizes": [obj["size"] for obj in mentioned],
            })
    return pd.DataFrame(rows, columns=MENTION_COLUMNS)


def with_mentions(per_query: pd.DataFrame, mentions: pd.DataFrame) -> pd.DataFrame:
    """`t2i.csv` rows with what each caption mentions, matched on image file name and caption text."""
    keyed = per_query.assign(image_file=per_query["image_path"].map(lambda path: Path(path).name))
    merged = keyed.merge(mentions, on=["image_file", "caption"], how="left", validate="many_to_one")
    missing = merged["objects"].isna()
    if missing.any():
        first = merged[missing].iloc[0]
        raise AvseError(f"{SCENES_FILE}: no caption {first['caption']!r} of {first['image_file']}: the outputs are stale, run `dvc repro`")
    return merged.astype({"objects": int})


def positive_and_hardest_negative(sims: Tensor, captions_per_image: int = 5) -> pd.DataFrame:
    """The score of each query's match and of its best-scoring non-match, from `[n_images, n_captions]`
    scores (caption j belongs to image j // captions_per_image): `[n_captions + n_images, 4]` with
    `direction` ("t2i" rows per caption first, then "i2t" per image), `query` (its position),
    `positive` and `hardest_negative`. An image's positive is its best own caption, as its rank counts."""
    n_images, n_captions = sims.shape
    own = (torch.arange(n_captions) // captions_per_image)[None, :] == torch.arange(n_images)[:, None]  # [n_images, n_captions]
    positives = sims.masked_fill(~own, float("-inf"))
    negatives = sims.masked_fill(own, float("-inf"))
    parts = [
        ("t2i", positives.amax(dim=0), negatives.amax(dim=0)),  # [n_captions] each
        ("i2t", positives.amax(dim=1), negatives.amax(dim=1)),  # [n_images] each
    ]
    return pd.concat([
        pd.DataFrame({"direction": direction, "query": np.arange(len(positive)), "positive": positive.numpy(), "hardest_negative": negative.numpy()})
        for direction, positive, negative in parts
    ], ignore_index=True)


def score_histogram(scores: pd.DataFrame, bins: int = 40) -> Figure:
    """Histograms of positive and hardest-negative scores, one panel per direction, titled with the
    share of queries whose hardest negative scores at least as high as the positive."""
    figure = Figure(figsize=(9, 3.2), layout="constrained")
    for ax, (direction, part) in zip(figure.subplots(1, 2, squeeze=False)[0], scores.groupby("direction", sort=False)):
        edges = np.histogram_bin_edges(np.concatenate([part["positive"], part["hardest_negative"]]), bins=bins)
        ax.hist(part["positive"], bins=edges, alpha=0.6, label="positive", color=HIT_COLOUR)
        ax.hist(part["hardest_negative"], bins=edges, alpha=0.6, label="hardest negative", color="tab:red")
        beaten = 100.0 * float((part["hardest_negative"] >= part["positive"]).mean())
        ax.set(xlabel="score", ylabel="queries", title=f"{direction}: hardest negative wins for {beaten:.1f}%")
        ax.legend(fontsize=8)
    return figure


def block_cosines(image_embedding: Tensor, caption_embedding: Tensor, block_dim: int) -> np.ndarray:
    """`[nt, nv]` cosines of each caption block (rows) with each image block (columns) for one pair:
    `image_embedding` is `[Di]`, `caption_embedding` `[Dt]`; image block v lies in view
    `v // (Dt / block_dim)`. The row maxima sum to the pair's `max`-matching score."""
    # Each block as an embedding of one block: the meta similarity of single blocks is their cosine.
    image_blocks = image_embedding.reshape(-1, block_dim)  # [nv, b]
    caption_blocks = caption_embedding.reshape(-1, block_dim)  # [nt, b]
    return meta_similarity(image_blocks, caption_blocks, block_dim).T.numpy()


def query_block_matches(embeddings: Embeddings, query: pd.Series) -> dict[str, np.ndarray]:
    """:func:`block_cosines` of a `t2i.csv` row's caption with its ground-truth image and, when
    different, its top-1 retrieved image, keyed by a panel title."""
    position = {int(image_id): index for index, image_id in enumerate(embeddings.image_ids)}
    caption = embeddings.captions[int(query["caption_index"])]
    block_dim = embeddings.meta["block_dim"]
    shown = {f"ground truth {query['image_id']}": query["image_id"]}
    if query["top1_image_id"] != query["image_id"]:
        shown[f"top-1 {query['top1_image_id']}"] = query["top1_image_id"]
    return {title: block_cosines(embeddings.images[position[int(image_id)]], caption, block_dim) for title, image_id in shown.items()}


def block_match_figure(matches: Mapping[str, np.ndarray], views: int, caption: str) -> Figure:
    """Heatmaps of :func:`block_cosines` (text blocks x image blocks, columns labelled `v<view>.<block>`),
    each text block's best image block boxed, titled with the sum of those maxima (the `max`-matching score)."""
    figure = Figure(figsize=(4.2 * len(matches), 2.8), layout="constrained")
    figure.suptitle(f'"{caption}"', fontsize=9)
    low, high = min(m.min() for m in matches.values()), max(m.max() for m in matches.values())
    axes = figure.subplots(1, len(matches), squeeze=False)[0]
    for ax, (title, cosines) in zip(axes, matches.items()):
        n_text, n_image = cosines.shape
        per_view = n_image // views
        heatmap = ax.imshow(cosines, cmap="viridis", vmin=low, vmax=high, aspect="auto")
        for row, column in enumerate(cosines.argmax(axis=1)):
            ax.add_patch(Rectangle((column - 0.5, row - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2))
        ax.set_xticks(range(n_image), [f"v{v // per_view}.{v % per_view}" for v in range(n_image)], fontsize=7)
        ax.set_yticks(range(n_text), [f"t{t}" for t in range(n_text)], fontsize=7)
        ax.set(xlabel="image block (view.block)", ylabel="text block")
        ax.set_title(f"{title}\nmax-matching score {cosines.max(axis=1).sum():.3f}", fontsize=9)
    figure.colorbar(heatmap, ax=axes, label="cosine")
    return figure


def mechanism_by_outcome(embeddings: Embeddings, t2i: pd.DataFrame) -> pd.DataFrame:
    """AVSE's diagnostics (`avse/evaluation/diagnostics.py`) over the split's captions: all of them, those
    whose image is retrieved first (`t2i.csv` rank 0) and those whose image is not. One row each, with
    the number of captions; `view_cosine` is the mean over the images of those captions."""
    meta = embeddings.meta
    chosen = chosen_blocks(embeddings.images, embeddings.captions, meta["block_dim"], embeddings.caption_image)  # [M, T]
    cosines = view_cosines(embeddings.images, meta["views"])[embeddings.caption_image]  # [M]: each caption's image
    n_blocks = embeddings.images.size(1) // meta["block_dim"]
    hit = np.zeros(len(chosen), dtype=bool)
    hit[t2i["caption_index"].to_numpy()[t2i["rank"].to_numpy() == 0]] = True
    rows = {}
    for name, keep in [("all captions", np.ones_like(hit)), ("t2i hit at R@1", hit), ("t2i miss at R@1", ~hit)]:
        index = torch.from_numpy(np.flatnonzero(keep))
        if len(index) == 0:  # a model without misses (or hits)
            continue
        rows[name] = {"captions": len(index), "view_cosine": float(cosines[index].mean()),
                      **choice_diagnostics(chosen[index], n_blocks, meta["views"])}
    return pd.DataFrame.from_dict(rows, orient="index")


def block_choice_shares(chosen: Tensor, n_blocks: int) -> np.ndarray:
    """`[T, B]`: for each text block (rows), the share of captions whose text block chose each image block."""
    one_hot = torch.nn.functional.one_hot(chosen, n_blocks).double()  # [M, T, B]
    return one_hot.mean(dim=0).numpy()


def mechanism_figure(embeddings: Embeddings) -> Figure:
    """Three panels over the split: each image's view cosine; for each text block, the share of captions
    choosing each image block (a text block that always picks the same block does not look at the content);
    and how many distinct image blocks a caption's text blocks use."""
    meta = embeddings.meta
    views, block_dim = meta["views"], meta["block_dim"]
    chosen = chosen_blocks(embeddings.images, embeddings.captions, block_dim, embeddings.caption_image)  # [M, T]
    n_blocks, n_text = embeddings.images.size(1) // block_dim, chosen.size(1)
    figure = Figure(figsize=(13, 3.4), layout="constrained")
    cosine_ax, share_ax, distinct_ax = figure.subplots(1, 3, width_ratios=[1, 1.4, 1])
    cosines = view_cosines(embeddings.images, views).numpy()
    cosine_ax.hist(cosines, bins=40, color="tab:blue")
    cosine_ax.set(xlabel="cosine between an image's views", ylabel="images", title=f"views: mean cosine {cosines.mean():.3f}")
    shares = block_choice_shares(chosen, n_blocks)
    heatmap = share_ax.imshow(100.0 * shares, cmap="magma", vmin=0, vmax=100, aspect="auto")
    per_view = n_blocks // views
    share_ax.set_xticks(range(n_blocks), [f"v{block // per_view}.{block % per_view}" for block in range(n_blocks)], fontsize=7)
    share_ax.set_yticks(range(n_text), [f"t{t}" for t in range(n_text)], fontsize=7)
    share_ax.set(xlabel="image block (view.block)", ylabel="text block", title="% of captions choosing each image block")
    figure.colorbar(heatmap, ax=share_ax, label="%")
    distinct = distinct_per_caption(chosen).numpy()
    distinct_ax.hist(distinct, bins=np.arange(0.5, n_text + 1.5), color="tab:purple", rwidth=0.8)
    distinct_ax.set(xlabel=f"distinct image blocks (of {n_text} text blocks)", ylabel="captions",
                    title=f"blocks per caption: mean {distinct.mean():.2f}")
    return figure


def patch_masks(indices: Tensor, grid: int) -> np.ndarray:
    """`[V, grid, grid]` booleans from the `[V, k]` kept patch indices of a row-major `grid x grid`."""
    masks = torch.zeros(indices.size(0), grid * grid, dtype=torch.bool)
    masks.scatter_(1, indices.cpu(), True)
    return masks.view(-1, grid, grid).numpy()


@torch.no_grad()
def evaluation_view_masks(model: AVSE, image: np.ndarray) -> np.ndarray:
    """:func:`patch_masks` of the deterministic evaluation views the model takes of `image`
    (`[R, R, 3]` uint8 at the model's resolution): `[V, grid, grid]`."""
    encoder = model.image_encoder
    was_training = encoder.training
    encoder.eval()
    _, indices = encoder.view_tokens(encoder.normalize_pixels(to_tensor(image)[None]))  # [1, V, k]
    encoder.train(was_training)
    return patch_masks(indices[0], encoder.grid)


def view_mask_figure(image: np.ndarray, masks: np.ndarray) -> Figure:
    """One panel per view: `image` (`[H, W, 3]`) with the patches the view drops tinted red."""
    height, width = image.shape[:2]
    figure = Figure(figsize=(2.4 * len(masks), 2.6), layout="constrained")
    for view, (ax, mask) in enumerate(zip(figure.subplots(1, len(masks), squeeze=False)[0], masks)):
        shade = np.zeros((*mask.shape, 4))
        shade[..., 0] = 1.0
        shade[..., 3] = np.where(mask, 0.0, 0.5)  # dropped patches tinted, kept ones clear
        _show_image(ax, image, f"view {view}: {int(mask.sum())} of {mask.size} patches")
        # The same pixel-centred extent as the image, so each patch lies over its pixels.
        ax.imshow(shade, extent=(-0.5, width - 0.5, height - 0.5, -0.5), interpolation="nearest")
    return figure


def coco_verified_misses(project: Path, config: Config) -> pd.DataFrame:
    """COCO's 5K test (`testall`): every miss of a query that ECCV Caption or CxC covers and which of them verified its
    top item (`eccv.verified_misses`), with split positions: `query_index` and `top_index` (an image's position for
    images, a caption's index for captions)."""
    split = load_split(project, config)
    annotations, alignment = coco_test_alignment(split, config.eval.pm_gt_dir)
    i2t, t2i = eccv.retrieved_items(score(load_embeddings(project, config), config.eval.chunk_size), alignment, 1, 1)
    misses = eccv.verified_misses(i2t, t2i, annotations)
    images = {int(image): position for position, image in enumerate(alignment.image_ids)}
    captions = {int(caption): index for index, caption in enumerate(alignment.caption_ids)}
    image_query = misses["direction"] == "i2t"
    misses["query_index"] = [(images if by_image else captions)[q] for by_image, q in zip(image_query, misses["query"])]
    misses["top_index"] = [(captions if by_image else images)[t] for by_image, t in zip(image_query, misses["top"])]
    return misses


def verified_miss_figure(misses: pd.DataFrame, images: SplitImages) -> Figure:
    """One row per miss of :func:`coco_verified_misses`: the query (a caption over its COCO image, or an image with its
    captions) beside what was retrieved first, and who verified that as a positive."""
    split = images.split
    figure = Figure(figsize=(9, 2.0 * len(misses)), layout="constrained")
    for subfigure, miss in zip(figure.subfigures(len(misses), 1, squeeze=False)[:, 0], misses.itertuples()):
        verdict = f"verified by {miss.verified_by}" if miss.verified_by else "a true miss"
        if miss.direction == "t2i":
            own = split.caption_image[miss.query_index]
            subfigure.suptitle(f'"{split.captions[miss.query_index]}"', fontsize=9)
            own_ax, top_ax, spare_ax = subfigure.subplots(1, 3, width_ratios=[1, 1, 3])
            _show_image(own_ax, images[split.image_ids[own]], "COCO's image", frame="black")
            _show_image(top_ax, images[split.image_ids[miss.top_index]], f"retrieved first: {verdict}",
                        frame=HIT_COLOUR if miss.verified_by else None)
            spare_ax.axis("off")
        else:
            image_ax, text_ax = subfigure.subplots(1, 2, width_ratios=[1, 5])
            _show_image(image_ax, images[split.image_ids[miss.query_index]], "query", frame="black")
            lines = ["its captions:", *(f"    {caption}" for caption in captions_of(split, miss.query_index)),
                     f"retrieved first ({verdict}):", f"    {split.captions[miss.top_index]}"]
            text_ax.text(0, 1, "\n".join(lines), va="top", family="monospace", fontsize=8)
            text_ax.axis("off")
    return figure
