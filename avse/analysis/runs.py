"""Tracked runs for the comparison notebook: the `avse compare` table, ablations by setting, training curves."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from avse.analysis.compare import comparison_table, load_runs
from avse.analysis.project import project_file
from avse.config import Config
from avse.errors import AvseError
from avse.tracking import store_uri

SETTINGS = ("backbone", "resolution", "views", "block_dim", "matching")
ABLATION_METRICS = ("rsum", "i2t_r1", "t2i_r1")
CURVE_METRICS = ("loss", "dev_rsum")
HISTORY_COLUMNS = ["run_id", "run_name", "metric", "step", "value"]
SQLITE = "sqlite:///"


def project_tracking_uri(project: Path, config: Config) -> str:
    """`tracking.uri` with a relative SQLite store anchored at `project`; an AvseError when that store does not exist
    (reading it must not create an empty one)."""
    if config.tracking.uri.startswith(SQLITE):
        project_file(project, config.tracking.uri[len(SQLITE):], "train")  # an absolute path stays as it is
    return store_uri(config.tracking.uri, root=project)


def project_runs(project: Path, config: Config, dataset: str | None = None) -> pd.DataFrame:
    """The project's runs as `avse compare` tabulates them (`[runs, len(compare.COLUMNS)]`, newest first),
    of one dataset when given."""
    uri = project_tracking_uri(project, config)
    table = comparison_table(load_runs(uri, config.tracking.experiment, dataset))
    if table.empty:
        raise AvseError(f"no runs in experiment {config.tracking.experiment!r} at {config.tracking.uri}" + (f" for dataset {dataset!r}" if dataset else ""))
    return table


def ablation_table(runs: pd.DataFrame, setting: str, metrics: Sequence[str] = ABLATION_METRICS) -> pd.DataFrame:
    """Runs grouped by dataset and one setting (a column of `runs`): `[groups, 1 + len(metrics)]` with
    the number of `runs` and the mean of each metric over the group's evaluated runs."""
    grouped = runs.astype({metric: float for metric in metrics}).groupby(["dataset", setting], dropna=False, sort=True)
    table = grouped[list(metrics)].mean()
    table.insert(0, "runs", grouped.size())
    return table


def ablation_figure(table: pd.DataFrame, metric: str = "rsum") -> Figure:
    """Bars of one metric of an :func:`ablation_table`, labelled by setting value (and dataset when
    there are several) and the number of runs."""
    datasets, values = table.index.get_level_values(0), table.index.get_level_values(1)
    several = datasets.nunique() > 1
    labels = [f"{dataset}: {value}" if several else f"{value}" for dataset, value in zip(datasets, values)]
    figure = Figure(figsize=(max(4.0, 1.1 * len(table) + 1.5), 3.2), layout="constrained")
    ax = figure.subplots()
    positions = np.arange(len(table))
    ax.bar(positions, table[metric], color="tab:blue")
    ax.set_xticks(positions, [f"{label}\n({runs} runs)" for label, runs in zip(labels, table["runs"])], fontsize=8)
    ax.set(xlabel=table.index.names[1], ylabel=metric, title=f"{metric} by {table.index.names[1]}")
    ax.grid(axis="y", alpha=0.3)
    return figure


def metric_histories(tracking_uri: str, runs: pd.DataFrame, metrics: Sequence[str] = CURVE_METRICS) -> pd.DataFrame:
    """Every logged value of `metrics` for each run of a comparison table: `[values, 5]` with
    `run_id`, `run_name`, `metric`, `step`, `value`, sorted by run (table order), metric and step."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    rows = [
        {"run_id": run.run_id, "run_name": run.run_name, "metric": metric, "step": point.step, "value": point.value}
        for run in runs.itertuples()
        for metric in metrics
        for point in sorted(client.get_metric_history(run.run_id, metric), key=lambda point: point.step)
    ]
    return pd.DataFrame(rows, columns=HISTORY_COLUMNS)


def training_curves_figure(histories: pd.DataFrame, metrics: Sequence[str] = CURVE_METRICS) -> Figure:
    """One panel per metric of :func:`metric_histories`, one line per run (labelled by run name), against the step."""
    figure = Figure(figsize=(4.5 * len(metrics), 3.2), layout="constrained")
    for ax, metric in zip(figure.subplots(1, len(metrics), squeeze=False)[0], metrics):
        for (run_id, run_name), curve in histories[histories["metric"] == metric].groupby(["run_id", "run_name"], sort=False):
            ax.plot(curve["step"], curve["value"], marker="o" if len(curve) < 10 else None, label=f"{run_name} ({run_id[:8]})")
        ax.set(xlabel="step", ylabel=metric, title=metric)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    return figure
