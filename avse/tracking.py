"""MLflow run lifecycle. Only the main process tracks; a tracking failure never stops training.

One MLflow run per training run: `start` opens it (or re-opens it when resuming, or when
a later stage reports into it), and the id is kept in `models/run.json`. Every call is
guarded: if the tracking store is unreachable the run goes on with one warning, metrics
are queued and sent when it answers again, and what is still unsent at the end is kept in
`metrics/untracked.jsonl`, which `avse tracking-sync` sends later.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from avse.config import TrackingConfig
from avse.errors import AvseError
from avse.run_info import SplitInput

log = logging.getLogger(__name__)

UNSENT_FILE = Path("metrics/untracked.jsonl")
MAX_PARAM_LENGTH = 500  # MLflow's limit on a parameter value


RETRY_SECONDS = 30.0  # after a failure, queue locally and try the store again this much later
# How often, and how long each time, MLflow asks a tracking server before it gives up (see `client_for`).
HTTP_RETRIES, HTTP_TIMEOUT = "MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT"
SYSTEM_METRICS_SECONDS = 10.0  # sampling interval of CPU, memory and GPU use


def store_uri(uri: str, root: Path | None = None) -> str:
    """`uri` with a relative SQLite path made absolute against the project root: `root` when
    given (a notebook names the project it reads), else DVC_ROOT or the current directory.

    `dvc exp run --queue` runs each experiment in a temporary copy of the project and
    points DVC_ROOT at the project itself: anchoring there puts every queued run in the
    project's store instead of one that is deleted with the copy.
    """
    prefix = "sqlite:///"
    if not uri.startswith(prefix) or Path(uri[len(prefix):]).is_absolute():
        return uri
    return prefix + str(project_root(root) / uri[len(prefix):])


# Set by a Slurm job (`avse.launch.slurm`) for the project its working copy belongs to: DVC_ROOT names the copy there.
PROJECT_ROOT_VARIABLE = "AVSE_PROJECT_ROOT"


def project_root(root: Path | None = None) -> Path:
    """`root`, else the project a Slurm job or a (possibly queued) DVC experiment runs for, else the current directory."""
    return Path(root or os.environ.get(PROJECT_ROOT_VARIABLE) or os.environ.get("DVC_ROOT") or ".").resolve()


def artifact_root(uri: str) -> str | None:
    """Where a new experiment of a local SQLite store keeps its artifacts: `mlruns/` beside the database."""
    if not uri.startswith("sqlite:///"):
        return None  # a server chooses its own
    return (Path(uri[len("sqlite:///"):]).parent / "mlruns").as_uri()


class Tracker:
    """MLflow client for one run; inactive (every call a no-op) off the main process or when disabled.

    Metrics are queued and sent in batches; while the store is unreachable they stay in the
    queue and are sent once it answers again. Whatever is still unsent when the run finishes
    is written to UNSENT_FILE, which `avse tracking-sync` sends later.
    """

    def __init__(self, config: TrackingConfig, active: bool = True):
        self.config = config
        self.uri = store_uri(config.uri)
        self.active = active and config.enabled
        self.run_id: str | None = None
        self._client = None
        self._failed = False
        self._pending: list[dict[str, Any]] = []
        self._retry_at = 0.0
        self._open: Callable[[], None] | None = None  # opens the run; retried while the store is down
        self._system = None  # the system metrics monitor of a training run

    def start(
        self, run_id: str | None, run_name: str, params: dict[str, Any], tags: dict[str, str], system_metrics: bool = False
    ) -> str | None:
        """Open (or re-open) the run; returns its id, or None when tracking is off or unreachable.

        `system_metrics` samples CPU, memory and GPU use into the run until `finish`.
        """
        if not self.active:
            return None

        def open_run():
            self._client = client_for(self.uri)
            self.run_id = open_run_in(self._client, self.config.experiment, self.uri, run_id, run_name, params, tags)

        # Kept so that a run the store never saw can be created later by `avse tracking-sync`.
        self._run_record = {"experiment": self.config.experiment, "run_name": run_name, "tags": tags,
                            "params": {k: str(v)[:MAX_PARAM_LENGTH] for k, v in params.items()}}
        self._open = open_run
        if not self._guard("open the MLflow run", open_run):
            self._retry_at = time.monotonic() + RETRY_SECONDS
        elif system_metrics:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self._system = SystemMetricsMonitor(
                self.run_id, SYSTEM_METRICS_SECONDS, resume_logging=run_id is not None, tracking_uri=self.uri
            )
            self._guard("start system metrics", self._system.start)
        return self.run_id

    def log_metrics(self, metrics: dict[str, float], step: int, model_id: str | None = None, dataset: SplitInput | None = None) -> None:
        """Queue and send `metrics` at `step`; `model_id` links them to a logged model (its page shows them),
        `dataset` to the split they were measured on."""
        if not self.active:
            return
        record: dict[str, Any] = {"metrics": {k: float(v) for k, v in metrics.items()}, "step": step, "timestamp": int(time.time() * 1000)}
        if model_id:
            record["model_id"] = model_id
        if dataset is not None:
            record["dataset_name"], record["dataset_digest"] = dataset.name, dataset.digest
        self._pending.append(record)
        self._flush()

    def log_model(self, models_dir: Path, metadata: dict[str, Any]) -> str | None:
        """Log `models_dir/best.pt` with its tokenizer as the run's MLflow model; returns its model id."""
        if not self.active or self.run_id is None:
            return None
        from avse import serving

        found: list[str] = []

        def log() -> None:
            import mlflow

            mlflow.set_tracking_uri(self.uri)
            found.append(serving.log_model(self.run_id, models_dir, metadata))

        self._guard("log the model", log)
        return found[0] if found else None

    def log_inputs(self, inputs: Sequence[SplitInput]) -> None:
        """The datasets the run read, each with its context (`training`, `evaluation`) and counts."""
        if self.active and self.run_id is not None:
            self._guard("log the datasets", lambda: self._client.log_inputs(self.run_id, datasets=[dataset_input(i) for i in inputs]))

    def set_tags(self, tags: dict[str, str]) -> None:
        if self.active and self.run_id is not None:
            self._guard("tag the run", lambda: [self._client.set_tag(self.run_id, key, value) for key, value in tags.items()])

    def log_artifact(self, path: str | Path, folder: str | None = None) -> None:
        if self.active and self.run_id is not None:
            self._guard(f"log artifact {path}", lambda: self._client.log_artifact(self.run_id, str(path), folder))

    def finish(self, status: str = "FINISHED") -> None:
        if not self.active:
            return
        if self._system is not None:
            self._guard("stop system metrics", self._system.finish)
        self._flush(force=True)
        if self.run_id is not None:
            self._guard("close the MLflow run", lambda: self._client.set_terminated(self.run_id, status=status))
        if self._pending:
            unsent = project_root() / UNSENT_FILE  # a queued experiment's copy of the project is deleted
            unsent.parent.mkdir(parents=True, exist_ok=True)
            with unsent.open("a", encoding="utf-8") as f:
                if self.run_id is None:  # the store was never reached: keep what creating the run needs
                    f.write(json.dumps({"tracking_uri": self.uri, "run_id": None, "run": self._run_record}) + "\n")
                for record in self._pending:
                    f.write(json.dumps({"tracking_uri": self.uri, "run_id": self.run_id, **record}) + "\n")
            log.warning("MLflow: %d metric records could not be sent; they are in %s: send them with `avse tracking-sync` "
                        "once %s is reachable", len(self._pending), unsent, self.uri)
            self._pending.clear()

    def _flush(self, force: bool = False) -> None:
        """Send the queued metrics, unless the store failed less than RETRY_SECONDS ago."""
        if not self._pending or (not force and time.monotonic() < self._retry_at):
            return
        if self.run_id is None and (self._open is None or not self._guard("open the MLflow run", self._open)):
            self._retry_at = time.monotonic() + RETRY_SECONDS
            return
        if self._guard("log metrics", lambda: send_metrics(self._client, self.run_id, self._pending)):
            if self._failed:
                log.info("MLflow: %s answers again; %d queued metric records sent", self.uri, len(self._pending))
                self._failed = False
            self._pending.clear()
        else:
            self._retry_at = time.monotonic() + RETRY_SECONDS

    def _guard(self, what: str, call: Callable[[], Any]) -> bool:
        try:
            call()
            return True
        except Exception as err:  # any tracking failure: the training result matters more
            if not self._failed:
                log.warning("MLflow: could not %s at %s (%s); training goes on and metrics are queued",
                            what, self.uri, str(err).splitlines()[0][:200])
            self._failed = True
            return False


def client_for(uri: str):
    """An MLflow client that fails fast when the store is down: one retry and 10 s for each answer, unless the
    environment says otherwise (MLflow's defaults, 7 retries with a doubling backoff, wait about four minutes)."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault(HTTP_RETRIES, "1")
    os.environ.setdefault(HTTP_TIMEOUT, "10")
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def store_error(uri: str, err: Exception) -> AvseError:
    """`err`, met reading the tracking store at `uri`, as one line; for a server, with how to let MLflow wait longer."""
    message = f"{uri}: cannot read the tracking store ({str(err).splitlines()[0]})"
    if uri.startswith(("http://", "https://")):
        message += (f"; MLflow gave up at {HTTP_RETRIES}={os.environ[HTTP_RETRIES]} and {HTTP_TIMEOUT}={os.environ[HTTP_TIMEOUT]} "
                    "(seconds for each answer): raise them to wait longer")
    return AvseError(message)


def runs_table_url(store: str, experiment: str, host: str, port: int) -> str:
    """Where MLflow's UI shows `experiment`'s runs table. MLflow 3 opens on its GenAI layout (an overview of
    traces) unless the address asks for model training; the experiments list when there is no such experiment yet."""
    found = client_for(store).get_experiment_by_name(experiment)
    page = f"experiments/{found.experiment_id}" if found else "experiments"
    return f"http://{host}:{port}/#/{page}?workflowType=machine_learning"


# MLflow's UI lays an experiment out by this tag: model training opens on the runs table, while an
# experiment without it opens on the GenAI overview of traces.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def ensure_experiment(client, experiment: str, uri: str) -> str:
    """The id of `experiment`, created (laid out as model training) if the store has none."""
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return client.create_experiment(experiment, artifact_location=artifact_root(uri), tags=EXPERIMENT_KIND)
    for key, value in EXPERIMENT_KIND.items():
        if key not in found.tags:  # an experiment made before, or by hand; a kind someone chose stays
            client.set_experiment_tag(found.experiment_id, key, value)
    return found.experiment_id


def open_run_in(client, experiment: str, uri: str, run_id: str | None, run_name: str, params: dict[str, Any], tags: dict[str, str]) -> str:
    """Re-open run `run_id`, or create one in `experiment` with `params`; set `tags`. Returns the run id."""
    from mlflow.entities import Param, RunTag

    if run_id is not None:
        client.update_run(run_id, status="RUNNING")
    else:
        run_id = client.create_run(ensure_experiment(client, experiment, uri), run_name=run_name).info.run_id
        values = [Param(k, str(v)[:MAX_PARAM_LENGTH]) for k, v in params.items()]
        for start in range(0, len(values), 100):
            client.log_batch(run_id, params=values[start : start + 100])
    keep_artifacts_beside_the_store(uri)
    client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items() if v])
    return run_id


# Where MLflow keeps each artifact location, as an absolute URI.
ARTIFACT_LOCATIONS = (("experiments", "artifact_location"), ("runs", "artifact_uri"), ("logged_models", "artifact_location"))


def keep_artifacts_beside_the_store(uri: str) -> None:
    """Point the artifact locations of a copied or moved SQLite store at the `mlruns/` beside it.

    MLflow keeps them as absolute paths: a copy of the project would log its runs' artifacts into the original's
    `mlruns/`. Locations under an experiment folder that `artifact_root` made beside another database (the store's
    earlier place) move under this one; locations chosen otherwise stay as they are.
    """
    here = artifact_root(uri)
    database = Path(uri[len("sqlite:///"):])
    if here is None or not database.exists():
        return
    with contextlib.closing(sqlite3.connect(database)) as db, db:
        moved = {location for (location,) in db.execute("SELECT artifact_location FROM experiments")
                 if location and location.startswith("file://") and location.endswith("/mlruns") and location != here}
        for old in moved:
            for table, column in ARTIFACT_LOCATIONS:
                db.execute(f"UPDATE {table} SET {column} = ? || substr({column}, ?) WHERE {column} = ? OR substr({column}, 1, ?) = ?",
                           (here, len(old) + 1, old, len(old) + 1, f"{old}/"))


def send_metrics(client, run_id: str, records: list[dict[str, Any]]) -> None:
    """Log metric records (`{"metrics": {...}, "step": s, "timestamp": ms}`, optionally with `model_id`,
    `dataset_name` and `dataset_digest`) in batches of 1000."""
    from mlflow.entities import Metric

    metrics = [Metric(k, v, r["timestamp"], r["step"], model_id=r.get("model_id"), dataset_name=r.get("dataset_name"),
                      dataset_digest=r.get("dataset_digest"))
               for r in records for k, v in r["metrics"].items()]
    for start in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[start : start + 1000])


def sync_unsent(path: Path = UNSENT_FILE) -> int:
    """Send the metric records that `Tracker.finish` kept in `path`; returns how many were sent.

    A run the store never saw is created first, from the run record kept before its
    metrics. Runs are sent one at a time; if one fails, the file keeps exactly what was
    not sent, so running it again sends nothing twice.
    """
    from avse.io import write_text

    if not path.exists():
        raise AvseError(f"{path}: nothing to send")
    groups: list[list[dict[str, Any]]] = []  # per run, in file order; a never-opened run starts with its run record
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:  # nothing is sent before every line is read
            raise AvseError(f"{path}:{number}: not a metric record ({err.msg}, column {err.colno}); a line cut short "
                            "when its writer was killed holds nothing to send: remove it and sync again") from None
        if "run" in record or not groups or record.get("run_id") != groups[-1][-1].get("run_id"):
            if record.get("run_id") is None and "run" not in record:
                raise AvseError(f"{path}:{number}: metrics of an unknown run (no run id and no run record before them)")
            groups.append([])
        groups[-1].append(record)
    sent = 0
    for index, group in enumerate(groups):
        uri, run_id = group[0]["tracking_uri"], group[0].get("run_id")
        metrics = [r for r in group if "run" not in r]
        try:
            client = client_for(uri)
            if run_id is None:
                spec = group[0]["run"]
                run_id = open_run_in(client, spec["experiment"], uri, None, spec["run_name"], spec["params"], spec["tags"])
            send_metrics(client, run_id, metrics)
            if "run" in group[0]:
                client.set_terminated(run_id, status="FINISHED")
        except Exception as err:
            write_text(path, "".join(json.dumps(r) + "\n" for g in groups[index:] for r in g))
            raise AvseError(f"{uri}: could not send metrics of run {run_id or group[0]['run']['run_name']} "
                            f"({str(err).splitlines()[0][:200]}); {sent} records sent, the rest kept in {path}") from None
        sent += len(metrics)
    path.unlink()
    return sent


def dataset_input(split: SplitInput):
    """A prepared split as an MLflow dataset input: its name, the digest of its index, the index as
    source, and its rows (captions) as the profile, with the image and caption counts as tags."""
    import mlflow.data
    import pandas as pd
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    index = pd.read_csv(split.index, keep_default_na=False)
    dataset = mlflow.data.from_pandas(index, source=str(split.index.resolve()), name=split.name, digest=split.digest)
    tags = {MLFLOW_DATASET_CONTEXT: split.context, "images": str(split.images), "captions": str(split.captions)}
    return DatasetInput(dataset=dataset._to_mlflow_entity(), tags=[InputTag(k, v) for k, v in tags.items()])
