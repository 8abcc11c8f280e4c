"""The training curve as a DVC plot: one row per logged step (loss, learning rate, pairs/s) and per dev evaluation
(dev rsum and AVSE's diagnostics, `avse/evaluation/diagnostics.py`), in `metrics/train_curve.csv`, rendered to
`metrics/train_curve.png` without a browser.

`last.pt` holds the rows up to its step: a resumed run keeps them and appends the rest, so the
file always describes one run from step 1.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from avse.io import atomic_path, write_text

CURVE_CSV = Path("metrics/train_curve.csv")
CURVE_PNG = Path("metrics/train_curve.png")
DIAGNOSTICS = ("view_cosine", "block_entropy", "distinct_blocks")  # of each dev evaluation, beside its rsum
COLUMNS = ("step", "epoch", "loss", "lr", "pairs_per_s", "dev_rsum", *(f"dev_{name}" for name in DIAGNOSTICS))


class TrainingCurve:
    def __init__(self, rows: list[dict[str, float]] | None = None):
        self.rows = rows or []

    @classmethod
    def load(cls, path: Path) -> "TrainingCurve":
        """The rows of `path`, each with the columns it has a value for."""
        with path.open(newline="", encoding="utf-8") as f:
            return cls([{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)])

    def add(self, step: int, epoch: int, **values: float) -> None:
        """A row at `step`; it replaces a row of the same step and kind (a dev evaluation repeated after a resume)."""
        self.rows = [row for row in self.rows if not (row["step"] == step and row.keys() - {"step", "epoch"} == values.keys())]
        self.rows.append({"step": step, "epoch": epoch, **values})

    def write(self, csv_path: Path = CURVE_CSV) -> None:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows({k: _number(row.get(k)) for k in COLUMNS} for row in self.rows)
        csv_path.parent.mkdir(parents=True, exist_ok=True)
        write_text(csv_path, buffer.getvalue())

    def render(self, png_path: Path = CURVE_PNG, title: str = "training") -> None:
        """Loss and learning rate against the step, dev rsum after each epoch, and AVSE's diagnostics, side by side."""
        from matplotlib.figure import Figure

        figure = Figure(figsize=(15, 3.4), layout="constrained")
        loss_ax, dev_ax, mechanism_ax = figure.subplots(1, 3)
        logged = [row for row in self.rows if "loss" in row]
        loss_ax.plot([r["step"] for r in logged], [r["loss"] for r in logged], color="tab:blue", label="loss")
        loss_ax.set(xlabel="step", ylabel="loss", title=f"{title}: loss")
        lr_ax = loss_ax.twinx()
        lr_ax.plot([r["step"] for r in logged], [r["lr"] for r in logged], color="tab:orange", alpha=0.6, label="lr")
        lr_ax.set_ylabel("learning rate")
        evaluated = [row for row in self.rows if "dev_rsum" in row]
        dev_ax.plot([r["step"] for r in evaluated], [r["dev_rsum"] for r in evaluated], marker="o", color="tab:green")
        dev_ax.set(xlabel="step", ylabel="dev rsum", title=f"{title}: dev rsum")
        for name in DIAGNOSTICS:
            shown = [row for row in evaluated if f"dev_{name}" in row]
            mechanism_ax.plot([r["step"] for r in shown], [r[f"dev_{name}"] for r in shown], marker="o", label=name.replace("_", " "))
        mechanism_ax.set(xlabel="step", title=f"{title}: views and blocks (dev)")
        mechanism_ax.legend(fontsize="small")
        for ax in (loss_ax, dev_ax, mechanism_ax):
            ax.grid(alpha=0.3)
        with atomic_path(png_path) as tmp:
            figure.savefig(tmp, dpi=110, format="png")


def _number(value: float | None) -> str:
    if value is None:
        return ""
    return str(int(value)) if float(value).is_integer() and abs(value) < 2**53 else f"{value:.6g}"
