"""Compare tracked runs: one row per MLflow run with its settings, test R@K, time and throughput, and one
row per experiment, the runs that differ only in `train.seed`, with the mean, sd and n of each metric."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from avse.config import OBSERVATION_KEYS, stable_hash
from avse.errors import AvseError
from avse.io import atomic_paths
from avse.tracking import client_for, store_error

METRICS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum")
# COCO's 5K test also reports ECCV Caption and CxC (`avse/evaluation/eccv.py`); columns shown where a run has them.
COCO_TEST_METRICS = ("eccv_i2t_map_at_r", "eccv_t2i_map_at_r", "eccv_i2t_rprecision", "eccv_t2i_rprecision", "eccv_i2t_r1", "eccv_t2i_r1",
                     "cxc_i2t_r1", "cxc_t2i_r1")
ALL_METRICS = (*METRICS, *COCO_TEST_METRICS)
# Evaluation protocols in order of preference when a run has several (COCO has two).
PROTOCOLS = ("1k", "5fold1k", "5k")
COLUMNS = ["run_id", "run_name", "start_time", "status", "dataset", "backbone", "resolution", "views", "block_dim", "matching",
           "epochs", "seed", "protocol", *ALL_METRICS, "train_seconds", "pairs_per_s", "dvc_experiment", "experiment", "differs"]
SETTING_COLUMNS = ["experiment", "differs", "dataset", "backbone", "resolution", "views", "block_dim", "matching", "epochs", "protocol"]
SUMMARY_COLUMNS = [*SETTING_COLUMNS, "n", "seeds", *(f"{m}_{s}" for m in ALL_METRICS for s in ("mean", "sd")), "pairs_per_s"]
SEED = "train.seed"
# Parameters that do not make two runs different experiments: the seed (what repeats vary), how a run
# is observed, and where it is tracked.
NOT_AN_EXPERIMENT_SETTING = {SEED, *OBSERVATION_KEYS}


def load_runs(tracking_uri: str, experiment: str, dataset: str | None = None, since: str | None = None) -> pd.DataFrame:
    """Runs of `experiment` as MLflow reports them (`params.*`, `metrics.*`, `tags.*` columns); a store that cannot
    be read is one line (`store_error`)."""
    import mlflow
    from mlflow.exceptions import MlflowException
    from sqlalchemy.exc import SQLAlchemyError

    filters = []
    if dataset:
        filters.append(f"tags.dataset = {_filter_string(dataset, '--dataset')}")
    if since:
        try:
            start = pd.Timestamp(since, tz="UTC")
        except ValueError:
            raise AvseError(f"--since: {since!r} is not a date (expected e.g. 2026-11-29)") from None
        filters.append(f"attributes.start_time >= {int(start.timestamp() * 1000)}")
    try:
        if client_for(tracking_uri).get_experiment_by_name(experiment) is None:
            raise AvseError(f"tracking.experiment: no experiment {experiment!r} at {tracking_uri}")
        mlflow.set_tracking_uri(tracking_uri)
        return mlflow.search_runs(experiment_names=[experiment], filter_string=" and ".join(filters), output_format="pandas")
    except (MlflowException, SQLAlchemyError) as err:  # a server that does not answer, a database that is not one
        raise store_error(tracking_uri, err) from None


def _filter_string(value: str, option: str) -> str:
    """`value` as a string of MLflow's search filters, which have no escapes: in a quote it does not hold."""
    for quote in ("'", '"'):
        if quote not in value:
            return f"{quote}{value}{quote}"
    raise AvseError(f"{option}: {value!r} holds both kinds of quote, which MLflow's search cannot match")


def comparison_table(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per run: settings, the test metrics of its preferred protocol, training time and throughput."""
    rows = []
    for _, run in runs.iterrows():
        protocol, prefix = _preferred_protocol(run)
        row = {
            "run_id": run["run_id"],
            "run_name": run.get("tags.mlflow.runName"),
            "start_time": run["start_time"],
            "status": run.get("status"),
            "dataset": run.get("tags.dataset"),
            "backbone": run.get("tags.backbone"),
            "resolution": _number(run.get("params.data.img_res")),
            "views": _number(run.get("params.model.views")),
            "block_dim": _number(run.get("params.model.block_dim")),
            "matching": run.get("params.model.matching"),
            "epochs": _number(run.get("params.train.epochs")),
            "seed": _number(run.get(f"params.{SEED}")),
            "protocol": protocol,
            "train_seconds": run.get("metrics.train_seconds"),
            "pairs_per_s": run.get("metrics.pairs_per_s"),
            "dvc_experiment": run.get("tags.dvc_experiment") or None,
        }
        row.update({name: run.get(f"{prefix}{name}") if prefix else None for name in METRICS})
        split_prefix = prefix.removesuffix(f"{protocol}_") if prefix else None  # e.g. "metrics.testall_"
        row.update({name: run.get(f"{split_prefix}{name}") if prefix else None for name in COCO_TEST_METRICS})
        rows.append(row)
    table = pd.DataFrame(rows, columns=COLUMNS)
    settings = experiment_settings(runs)
    table["experiment"] = [stable_hash(setting)[:8] for setting in settings]
    table["differs"] = differing_settings(settings)
    return table.sort_values("start_time", ascending=False, kind="stable").reset_index(drop=True)


def experiment_settings(runs: pd.DataFrame) -> list[dict[str, str]]:
    """Each run's parameters that make it the experiment it is: all but `NOT_AN_EXPERIMENT_SETTING`
    and the tracking section (parameters a run did not log are left out)."""
    names = [c.removeprefix("params.") for c in runs.columns if c.startswith("params.")]
    kept = [n for n in names if n not in NOT_AN_EXPERIMENT_SETTING and not n.startswith("tracking.")]
    return [{n: run[f"params.{n}"] for n in sorted(kept) if pd.notna(run[f"params.{n}"])} for _, run in runs.iterrows()]


def differing_settings(settings: list[dict[str, str]]) -> list[str]:
    """For each run, `key=value` of the settings on which the runs' experiments disagree (empty when they all agree)."""
    keys = sorted({k for s in settings for k in s})
    varying = [k for k in keys if len({s.get(k) for s in settings}) > 1]
    return [" ".join(f"{k}={s[k]}" for k in varying if k in s) for s in settings]


def seed_summary(table: pd.DataFrame) -> pd.DataFrame:
    """One row per experiment of a :func:`comparison_table` (runs that differ only in the seed): its settings,
    `n` (evaluated runs), their `seeds`, and the mean and sample sd (n - 1; none for one run) of each metric.

    Rows come in the table's order of each experiment's newest run.
    """
    rows = []
    for _, runs in table.groupby("experiment", sort=False):
        evaluated = runs.dropna(subset=["rsum"])
        row = runs.iloc[0][SETTING_COLUMNS].to_dict()
        row["n"] = len(evaluated)
        row["seeds"] = ",".join(str(int(s)) for s in sorted(evaluated["seed"].dropna()))
        for metric in ALL_METRICS:
            values = evaluated[metric].astype(float)
            row[f"{metric}_mean"], row[f"{metric}_sd"] = values.mean(), values.std(ddof=1)
        row["pairs_per_s"] = evaluated["pairs_per_s"].astype(float).mean()
        rows.append(row)
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)


def _preferred_protocol(run: pd.Series) -> tuple[str | None, str | None]:
    """(protocol, metric column prefix) of the evaluation to report, e.g. ("1k", "metrics.test_1k_")."""
    found = {}
    for column in run.index:
        match = re.fullmatch(r"metrics\.(\w+?)_(1k|5fold1k|5k)_rsum", column)
        if match and pd.notna(run[column]):
            found.setdefault(match.group(2), f"metrics.{match.group(1)}_{match.group(2)}_")
    for protocol in PROTOCOLS:
        if protocol in found:
            return protocol, found[protocol]
    return None, None


def _number(value):
    return pd.to_numeric(value, errors="coerce") if value is not None else None


def write_comparison(table: pd.DataFrame, out_dir: Path) -> list[Path]:
    """`comparison.csv`, `comparison.md` and `comparison.png` (rsum of each experiment, mean and sd over
    its seeds), and `comparison_runs.csv` (every run)."""
    summary = seed_summary(table)
    paths = [out_dir / "comparison.csv", out_dir / "comparison.md", out_dir / "comparison.png", out_dir / "comparison_runs.csv"]
    with atomic_paths(*paths) as (summary_csv, markdown, figure, runs_csv):
        summary.to_csv(summary_csv, index=False)
        markdown.write_text(_markdown(summary_for_reading(summary)) + "\n", encoding="utf-8")
        seed_summary_figure(summary).savefig(figure, dpi=120, format="png")
        table.to_csv(runs_csv, index=False)
    return paths


def summary_for_reading(summary: pd.DataFrame) -> pd.DataFrame:
    """A :func:`seed_summary` with each metric as `mean ± sd` (one decimal; the mean alone for one run); ECCV Caption
    and CxC where some experiment has them."""
    shown = summary[[*SETTING_COLUMNS, "n", "seeds"]].copy()
    for metric in (*METRICS, *(m for m in COCO_TEST_METRICS if summary[f"{m}_mean"].notna().any())):
        shown[metric] = [_mean_sd(m, s) for m, s in zip(summary[f"{metric}_mean"], summary[f"{metric}_sd"])]
    shown["pairs_per_s"] = summary["pairs_per_s"].round(0)
    return shown


def _mean_sd(mean: float, sd: float) -> str:
    if pd.isna(mean):
        return ""
    return f"{mean:.1f}" if pd.isna(sd) else f"{mean:.1f} ± {sd:.1f}"


def _markdown(table: pd.DataFrame) -> str:
    header = "| " + " | ".join(table.columns) + " |"
    rule = "| " + " | ".join("---" for _ in table.columns) + " |"
    body = ["| " + " | ".join("" if pd.isna(v) else str(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join([header, rule, *body])


def seed_summary_figure(summary: pd.DataFrame, metric: str = "rsum") -> Figure:
    """Bars of one metric of a :func:`seed_summary`: the mean over each experiment's seeds, sd as error bars."""
    scored = summary.dropna(subset=[f"{metric}_mean"])
    labels = [f"{experiment_label(row)}\n(n={row.n})" for row in scored.itertuples()]
    figure = Figure(figsize=(max(4, 1.6 * len(scored) + 1), 3.8), layout="constrained")
    ax = figure.subplots()
    ax.bar(range(len(scored)), scored[f"{metric}_mean"], yerr=scored[f"{metric}_sd"].fillna(0), capsize=4, color="tab:blue")
    ax.set_xticks(range(len(scored)), labels, fontsize=7)
    ax.set(ylabel=f"{metric} (mean ± sd over seeds)", title=f"{metric} by experiment")
    ax.grid(axis="y", alpha=0.3)
    return figure


def experiment_label(row) -> str:
    """What tells an experiment apart: its differing settings, one per line, else its backbone and resolution."""
    if row.differs:
        return "\n".join(row.differs.split(" "))
    resolution = f"{int(row.resolution)}px" if pd.notna(row.resolution) else "?px"
    return f"{str(row.backbone).split('/')[-1]} {resolution}"
