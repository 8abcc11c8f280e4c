"""MLflow run lifecycle. Only the main process tracks; a tracking failure never stops training.

One MLflow run per training run: `start` opens it (or re-opens it when resuming, or when
a later stage reports into it), and the id is kept in `models/run.json`. Every call is
guarded: if the tracking store is unreachable the run goes on with one warning, and what
could not be sent is kept in `metrics/untracked.jsonl` with instructions to import it.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable

from avse.config import TrackingConfig

log = logging.getLogger(__name__)

UNSENT_FILE = Path("metrics/untracked.jsonl")
MAX_PARAM_LENGTH = 500  # MLflow's limit on a parameter value


class Tracker:
    """MLflow client for one run; inactive (every call a no-op) off the main process or when disabled."""

    def __init__(self, config: TrackingConfig, active: bool = True):
        self.config = config
        self.active = active and config.enabled
        self.run_id: str | None = None
        self._client = None
        self._failed = False
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

    def start(self, run_id: str | None, run_name: str, params: dict[str, Any], tags: dict[str, str]) -> str | None:
        """Open (or re-open) the run; returns its id, or None when tracking is off or unreachable."""
        if not self.active:
            return None

        def open_run():
            from mlflow.entities import Param, RunTag
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(tracking_uri=self.config.uri)
            if run_id is not None:
                self._client.update_run(run_id, status="RUNNING")
                self.run_id = run_id
            else:
                experiment = self._client.get_experiment_by_name(self.config.experiment)
                experiment_id = experiment.experiment_id if experiment else self._client.create_experiment(self.config.experiment)
                self.run_id = self._client.create_run(experiment_id, run_name=run_name).info.run_id
                values = [Param(k, str(v)[:MAX_PARAM_LENGTH]) for k, v in params.items()]
                for start in range(0, len(values), 100):
                    self._client.log_batch(self.run_id, params=values[start : start + 100])
            self._client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items() if v])

        self._guard("open the MLflow run", open_run)
        return self.run_id

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if not self.active:
            return
        timestamp = int(time.time() * 1000)

        def send():
            from mlflow.entities import Metric

            self._client.log_batch(self.run_id, metrics=[Metric(k, float(v), timestamp, step) for k, v in metrics.items()])

        if self.run_id is None or not self._guard("log metrics", send):
            self._keep_unsent({"metrics": metrics, "step": step, "timestamp": timestamp})

    def log_artifact(self, path: str | Path, folder: str | None = None) -> None:
        if self.active and self.run_id is not None:
            self._guard(f"log artifact {path}", lambda: self._client.log_artifact(self.run_id, str(path), folder))

    def set_tags(self, tags: dict[str, str]) -> None:
        if self.active and self.run_id is not None:
            self._guard("set tags", lambda: [self._client.set_tag(self.run_id, k, v) for k, v in tags.items()])

    def finish(self, status: str = "FINISHED") -> None:
        if self.active and self.run_id is not None:
            self._guard("close the MLflow run", lambda: self._client.set_terminated(self.run_id, status=status))

    def _guard(self, what: str, call: Callable[[], Any]) -> bool:
        try:
            call()
            return True
        except Exception as err:  # any tracking failure: the training result matters more
            if not self._failed:
                log.warning("MLflow: could not %s at %s (%s); training goes on, unsent metrics go to %s",
                            what, self.config.uri, str(err).splitlines()[0][:200], UNSENT_FILE)
            self._failed = True
            return False

    def _keep_unsent(self, record: dict[str, Any]) -> None:
        UNSENT_FILE.parent.mkdir(parents=True, exist_ok=True)
        with UNSENT_FILE.open("a", encoding="utf-8") as f:
            f.write(json.dumps({"run_id": self.run_id, **record}) + "\n")
