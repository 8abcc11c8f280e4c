"""The Model Registry: the best run per dataset, backbone and resolution, registered under an alias.

`avse register` reads the experiment's runs as `avse compare` tabulates them, keeps the
finished runs with a logged model and a test rsum, and for each (dataset, backbone,
resolution) registers the model of the highest-rsum run as a version of
`avse-<dataset>-<backbone>-<resolution>`, pointing the alias (default `champion`) at it.
Registering again when the best run has not changed adds no version.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import pandas as pd

from avse.analysis.compare import comparison_table, load_runs
from avse.errors import AvseError

ALIAS = "champion"


@dataclass(frozen=True)
class Champion:
    name: str  # registered model name
    version: str
    alias: str
    run_id: str
    model_id: str
    rsum: float
    new: bool  # False when the alias already pointed at this model


def registered_name(dataset: str, backbone: str, resolution: int) -> str:
    """`avse-f30k-vit-base-patch16-224-in21k-224`: letters, digits and dashes only."""
    short = re.sub(r"[^A-Za-z0-9]+", "-", str(backbone).rstrip("/").split("/")[-1]).strip("-")
    return f"avse-{dataset}-{short}-{int(resolution)}"


def best_runs(table: pd.DataFrame) -> pd.DataFrame:
    """The highest-rsum finished run of each (dataset, backbone, resolution) of a comparison table."""
    finished = table[(table["status"] == "FINISHED") & table["rsum"].notna()]
    best = finished.sort_values(["rsum", "start_time"], ascending=[False, False], kind="stable")
    return best.drop_duplicates(["dataset", "backbone", "resolution"]).reset_index(drop=True)


def register_champions(tracking_uri: str, experiment: str, alias: str = ALIAS, dataset: str | None = None) -> list[Champion]:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    table = comparison_table(load_runs(tracking_uri, experiment, dataset))
    champions = []
    for row in best_runs(table).itertuples():
        outputs = client.get_run(row.run_id).outputs
        models = outputs.model_outputs if outputs else []
        if not models:
            raise AvseError(f"run {row.run_id} ({row.run_name}) has the best rsum of {row.dataset} {row.backbone} "
                            f"{row.resolution}px but no logged model (trained before models were logged?)")
        model_id = models[0].model_id
        name = registered_name(row.dataset, row.backbone, row.resolution)
        try:
            current = client.get_model_version_by_alias(name, alias)
        except MlflowException:
            current = None
        if current is not None and current.source == f"models:/{model_id}":
            champions.append(Champion(name, current.version, alias, row.run_id, model_id, float(row.rsum), new=False))
            continue
        try:
            client.get_registered_model(name)
        except MlflowException:
            client.create_registered_model(name, tags={"dataset": row.dataset, "backbone": row.backbone, "resolution": str(row.resolution)})
        version = client.create_model_version(name, source=f"models:/{model_id}", run_id=row.run_id, model_id=model_id,
                                              tags={"rsum": f"{row.rsum:.2f}", "protocol": str(row.protocol)})
        client.set_registered_model_alias(name, alias, version.version)
        champions.append(Champion(name, version.version, alias, row.run_id, model_id, float(row.rsum), new=True))
    if not champions:
        raise AvseError(f"no finished run with a test rsum in experiment {experiment!r} at {tracking_uri}"
                        + (f" for dataset {dataset!r}" if dataset else ""))
    return champions
