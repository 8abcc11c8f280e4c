"""Compare tracked runs: one row per MLflow run with its settings, test R@K, time and throughput."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from avse.errors import AvseError
from avse.io import atomic_path

METRICS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum")
# Evaluation protocols in order of preference when a run has several (COCO has two).
PROTOCOLS = ("1k", "5fold1k", "5k")
COLUMNS = ["run_id", "run_name", "start_time", "status", "dataset", "backbone", "resolution", "views", "block_dim", "matching",
           "epochs", "protocol", *METRICS, "train_seconds", "pairs_per_s", "dvc_experiment"]


def load_runs(tracking_uri: str, experiment: str, dataset: str | None = None, since: str | None = None) -> pd.DataFrame:
    """Runs of `experiment` as MLflow reports them (`params.*`, `metrics.*`, `tags.*` columns)."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    if mlflow.get_experiment_by_name(experiment) is None:
        raise AvseError(f"tracking.experiment: no experiment {experiment!r} at {tracking_uri}")
    filters = []
    if dataset:
        filters.append(f"tags.dataset = '{dataset}'")
    if since:
        try:
            start = pd.Timestamp(since, tz="UTC")
        except ValueError:
            raise AvseError(f"--since: {since!r} is not a date (expected e.g. 2026-11-29)") from None
        filters.append(f"attributes.start_time >= {int(start.timestamp() * 1000)}")
    return mlflow.search_runs(experiment_names=[experiment], filter_string=" and ".join(filters), output_format="pandas")


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
            "protocol": protocol,
            "train_seconds": run.get("metrics.train_seconds"),
            "pairs_per_s": run.get("metrics.pairs_per_s"),
            "dvc_experiment": run.get("tags.dvc_experiment") or None,
        }
        row.update({name: run.get(f"{prefix}{name}") if prefix else None for name in METRICS})
        rows.append(row)
    table = pd.DataFrame(rows, columns=COLUMNS)
    return table.sort_values("start_time", ascending=False, kind="stable").reset_index(drop=True)


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
    """`comparison.csv`, `comparison.md` and `comparison.png` (rsum by backbone and resolution)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "comparison.csv", out_dir / "comparison.md", out_dir / "comparison.png"]
    with atomic_path(paths[0]) as tmp:
        table.to_csv(tmp, index=False)
    shown = table.drop(columns=["run_id", "start_time"]).round(2)
    with atomic_path(paths[1]) as tmp:
        tmp.write_text(_markdown(shown) + "\n", encoding="utf-8")
    with atomic_path(paths[2]) as tmp:
        _plot_rsum(table, tmp)
    return paths


def _markdown(table: pd.DataFrame) -> str:
    header = "| " + " | ".join(table.columns) + " |"
    rule = "| " + " | ".join("---" for _ in table.columns) + " |"
    body = ["| " + " | ".join("" if pd.isna(v) else str(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join([header, rule, *body])


def _plot_rsum(table: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scored = table.dropna(subset=["rsum"])
    labels = [f"{b.split('/')[-1]}\n{int(r) if pd.notna(r) else '?'}px" for b, r in zip(scored["backbone"], scored["resolution"])]
    fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(scored) + 1), 3.5))
    ax.bar(range(len(scored)), scored["rsum"], color="tab:blue")
    ax.set_xticks(range(len(scored)), labels, fontsize=8)
    ax.set(ylabel="rsum", title="rsum by backbone and resolution")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120, format="png")
    plt.close(fig)
