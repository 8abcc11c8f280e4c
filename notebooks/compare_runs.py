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
# # Comparing runs
#
# Every training run tracked in the project's MLflow store (`tracking.uri`, experiment
# `tracking.experiment`), one row each as `avse compare` tabulates them: settings, the test
# metrics of its evaluation protocol, training time and throughput.
#
# The project is the folder named by `AVSE_PROJECT`, else the one this notebook is run from.

# %%
# %matplotlib inline
from IPython.display import display

from avse.analysis import compare, runs as tracked
from avse.analysis.project import find_project, project_config

PROJECT = find_project()
config = project_config(PROJECT)
DATASET = None  # e.g. "f30k" to compare the runs of one dataset only
table = tracked.project_runs(PROJECT, config, DATASET)
table

# %% [markdown]
# ## Experiments over seeds
#
# Runs that differ only in `train.seed` (and in how they were observed: logging and checkpoint
# intervals, loader workers) are repeats of one experiment: one row each, with the number of
# evaluated runs, their seeds, and the mean and standard deviation of every metric. A
# difference between two experiments smaller than their spread is no difference. Queue seeds
# with `dvc exp run --queue -S 'train.seed=0,1,2'`.

# %%
summary = compare.seed_summary(table)
display(compare.summary_for_reading(summary))
compare.seed_summary_figure(summary)

# %% [markdown]
# ## Backbones, resolutions and ablations
#
# Runs grouped by dataset and one setting at a time, with the mean test metrics of each
# group. A group averages over runs that may differ in other settings: read it with the
# table above.

# %%
for setting in tracked.SETTINGS:
    ablation = tracked.ablation_table(table, setting)
    display(ablation)
    display(tracked.ablation_figure(ablation))

# %% [markdown]
# ## Training curves
#
# Training loss (logged every `train.log_every` steps) and the dev split's rsum (after every
# epoch), per run.

# %%
histories = tracked.metric_histories(tracked.project_tracking_uri(PROJECT, config), table)
tracked.training_curves_figure(histories)
