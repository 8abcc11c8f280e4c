# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Failure analysis
#
# Where the evaluated model goes wrong, read from the evaluate stage's outputs
# (`metrics/eval.json`, `outputs/eval/{t2i,i2t}.csv`, `embeddings/<split>/`,
# `data/prepared/<dataset>/`). Nothing is re-encoded; the last section loads the trained
# model from `models/` to draw its evaluation views.
#
# The project is the folder named by `AVSE_PROJECT`, else the one this notebook is run from
# (`notebooks/` finds its parent). Run `dvc repro` there first.

# %%
# %matplotlib inline
from IPython.display import display

from avse.analysis import failures
from avse.analysis.project import find_project, project_config, project_file
from avse.evaluation.embed import load_trained
from avse.evaluation.evaluate import score

PROJECT = find_project()
config = project_config(PROJECT)
WORST = 4  # failures shown per direction
print(f"project {PROJECT}: {config.data.dataset}, split {config.embed.split}")

# %% [markdown]
# ## Recall at K

# %%
failures.recall_summary(failures.load_eval_metrics(PROJECT))

# %% [markdown]
# ## Worst text-to-image failures
#
# Each caption over its ground-truth image (with its rank, 1 = retrieved first) and the five
# images retrieved for it, with their scores.

# %%
t2i = failures.load_per_query(PROJECT, "t2i")
i2t = failures.load_per_query(PROJECT, "i2t")
split = failures.load_split(PROJECT, config)
images = failures.SplitImages(split, config.data.img_res, config.data.resize)
worst_t2i = failures.worst_queries(t2i, WORST)
failures.t2i_failure_figure(worst_t2i, images)

# %% [markdown]
# ## Worst image-to-text failures
#
# Each image with its own captions and the five captions retrieved for it (`+`: one of its own).

# %%
failures.i2t_failure_figure(failures.worst_queries(i2t, WORST), images)

# %% [markdown]
# ## COCO: misses that are the annotation's
#
# COCO's 5K test counts a caption of another image that truly describes an image as a miss. ECCV
# Caption and CxC re-annotated the split; among the misses (the item retrieved first is not a COCO
# positive) of the queries they cover, the share whose first item one of them verified is the
# annotation's error, not the model's (also logged with the run as `testall_verified_misses_*`).

# %%
if config.data.dataset == "coco" and config.embed.split == "testall":
    coco_misses = failures.coco_verified_misses(PROJECT, config)
    display(coco_misses.groupby("direction")["verified_by"].value_counts().unstack(fill_value=0))
    verified = coco_misses[coco_misses["verified_by"] != ""]
    failures.verified_miss_figure(verified.groupby("direction").head(WORST // 2), images)
else:
    print("ECCV Caption and CxC re-annotate COCO's 5K test only (data.dataset: coco, embed.split: testall)")

# %% [markdown]
# ## Recall by caption length

# %%
by_length = failures.recall_by(t2i, failures.caption_words(t2i))
display(by_length)
failures.recall_by_figure(by_length, "text-to-image recall by caption length")

# %% [markdown]
# ## Recall by what a caption mentions (synthetic data)
#
# From the scene metadata the synthetic dataset writes (`scenes.jsonl`): how many objects a
# caption names, its spatial relation ("none" for a list of objects), and the shapes, colours
# and sizes it names (a caption naming two shapes counts for both).

# %%
if config.data.dataset == "synthetic":
    mentions = failures.with_mentions(t2i, failures.load_caption_mentions(PROJECT, config))
    for column, title in [("objects", "objects named"), ("relation", "spatial relation"), ("shapes", "shape"), ("colours", "colour"), ("sizes", "size")]:
        by_mention = failures.recall_by(mentions, column)
        display(by_mention)
        display(failures.recall_by_figure(by_mention, f"text-to-image recall by {title}"))
else:
    print(f"{config.data.dataset} has no scene metadata: this section is for the synthetic dataset")

# %% [markdown]
# ## Positives against hardest negatives
#
# For every query, the score of its match and of the best-scoring wrong candidate (scored
# again from the saved embeddings). Where the red mass lies right of the green, the model
# ranks a wrong candidate first.

# %%
embeddings = failures.load_embeddings(PROJECT, config)
scores = failures.positive_and_hardest_negative(score(embeddings, config.eval.chunk_size))
display(scores.groupby("direction")[["positive", "hardest_negative"]].describe().T)
failures.score_histogram(scores)

# %% [markdown]
# ## AVSE's mechanism over the split
#
# Whether the views of an image differ and which image blocks the text blocks choose (each
# text block's best image block of its caption's own image), over every caption of the split
# and apart for captions whose image is retrieved first and those whose image is not. The same
# numbers are logged at every dev evaluation while training (`dev_view_cosine`, ...). A view
# cosine near 1 means the views are one vector; `block_entropy` is in bits (log2 of the image
# blocks at most), `distinct_blocks` counts a caption's different image blocks. In the
# figure, a text block whose row has one bright cell chooses the same image block whatever
# the caption and image: its match does not depend on the content.

# %%
display(failures.mechanism_by_outcome(embeddings, t2i).round(3))
failures.mechanism_figure(embeddings)

# %% [markdown]
# ## Which view and block each text block matched
#
# For the worst text-to-image failure: the cosine of each caption block with each image
# block (`v<view>.<block>`), each text block's best image block boxed; with `max` matching
# the boxed cosines sum to the pair's score. Its ground-truth image is compared with the image
# ranked first.

# %%
query = worst_t2i.iloc[0]
failures.block_match_figure(failures.query_block_matches(embeddings, query), embeddings.meta["views"], query["caption"])

# %% [markdown]
# ## The model's evaluation views
#
# The patches each deterministic evaluation view keeps of the query's ground-truth image
# (dropped patches tinted red).

# %%
model, trained, _, _ = load_trained(project_file(PROJECT, "models/best.pt", "train").parent)
image = failures.SplitImages(split, trained.data.img_res, trained.data.resize)[query["image_id"]]
failures.view_mask_figure(image, failures.evaluation_view_masks(model, image))
