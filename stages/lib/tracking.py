"""MLflow tracking for stage runs, written once and used by every stage.

Each stage execution is one MLflow run tagged with the stage, the git commit and the DVC experiment name; it logs
the flattened params, step metrics, image grids and the final metrics. The same final metrics always land in
``reports/<stage>/metrics.json`` for ``dvc metrics show``/``dvc exp show`` -- also when tracking fails, in which
case the failure is reported and the stage's real outputs are still written.
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from PIL import Image

from stages.lib.config import to_flat_dict
from stages.lib.schema import TrackingConfig

log = logging.getLogger(__name__)
METRIC_BATCH = 1000  # MLflow's limit of metrics in one log_batch call
FLUSH_SECONDS = 5.0  # step metrics reach MLflow at least this often


def project_root() -> Path:
    """The DVC root of the parent repo (queued experiments run in temporary copies), else the cwd."""
    return Path(os.environ.get("DVC_ROOT") or os.getcwd()).resolve()


def tracking_uri(cfg: TrackingConfig) -> str:
    """The configured MLflow URI, or a SQLite store at the DVC root."""
    return cfg.uri or f"sqlite:///{project_root() / 'mlflow.db'}"


def git_commit() -> str:
    """The current git commit of the working directory, or "unknown"."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _finite(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and math.isfinite(float(v))}


class StageTracker:
    """Logs to one MLflow run; every call degrades to a warning if MLflow fails."""

    def __init__(self, stage: str, cfg: TrackingConfig, reports_dir: Path, active: bool = True) -> None:
        self.stage = stage
        self.active = active  # False in the non-main processes of a multi-process run: log and write nothing
        self.cfg = cfg
        self.reports_dir = reports_dir
        self.metrics: dict[str, Any] = {}
        self.errors: list[str] = []
        self.run_id: str | None = None
        self._mlflow: Any = None
        self._pending: list[Any] = []  # step metrics not yet written (mlflow.entities.Metric)
        self._last_flush = time.monotonic()

    # -- lifecycle -------------------------------------------------------------------------------------------
    def start(self, params: dict[str, Any]) -> None:
        if not (self.cfg.enabled and self.active):
            return
        self._guard("start run", self._start, params)

    def _start(self, params: dict[str, Any]) -> None:
        import mlflow

        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        uri = tracking_uri(self.cfg)
        mlflow.set_tracking_uri(uri)
        if mlflow.get_experiment_by_name(self.cfg.experiment_name) is None:
            artifact_location = None
            if uri.startswith("sqlite:///") and not self.cfg.uri:
                artifact_location = (project_root() / "mlartifacts").as_uri()
            mlflow.create_experiment(self.cfg.experiment_name, artifact_location=artifact_location)
        mlflow.set_experiment(self.cfg.experiment_name)
        exp_name = os.environ.get("DVC_EXP_NAME", "")
        run_name = f"{self.stage}" + (f" [{exp_name}]" if exp_name else "")
        tags = {"stage": self.stage, "git_commit": git_commit(), "dvc_exp_name": exp_name}
        run = mlflow.start_run(run_name=run_name, tags=tags)
        self.run_id = run.info.run_id
        self._mlflow = mlflow
        # MLflow limits a param value to 6000 chars and a batch to 100 params.
        items = [(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            mlflow.log_params(dict(items[i : i + 100]))

    def finish(self, status: str) -> None:
        self.write_metrics_file()
        self.end(status)

    def end(self, status: str) -> None:
        """Write the pending step metrics and end the MLflow run with ``status``."""
        if self._mlflow is not None:
            self.flush()
            self._guard("end run", self._mlflow.end_run, status)
            self._mlflow = None

    def _guard(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> None:
        try:
            fn(*args, **kwargs)
        except Exception as err:  # tracking must never lose the stage's outputs
            msg = f"MLflow tracking failed ({what}) for stage '{self.stage}': {err}"
            self.errors.append(msg)
            warnings.warn(msg, RuntimeWarning, stacklevel=3)
            log.warning(msg)

    # -- logging ----------------------------------------------------------------------------------------------
    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        """Step metrics (loss curves...) go to MLflow only, in batches: one write every few seconds instead of
        one per training step, which costs as much as a tiny-model step (benchmarks/train_step.py --model tiny)."""
        if self._mlflow is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._pending += [Metric(k, v, now, step or 0) for k, v in _finite(metrics).items()]
        if len(self._pending) >= METRIC_BATCH or time.monotonic() - self._last_flush >= FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        """Write the pending step metrics to MLflow."""
        pending, self._pending = self._pending, []
        self._last_flush = time.monotonic()
        if self._mlflow is None or not pending:
            return
        client = self._mlflow.MlflowClient()
        for i in range(0, len(pending), METRIC_BATCH):
            self._guard("log metrics", client.log_batch, self.run_id, metrics=pending[i : i + METRIC_BATCH])

    def set_final_metrics(self, metrics: dict[str, Any]) -> None:
        """Final metrics: reports/<stage>/metrics.json as given (nesting kept, e.g. one object per variant)
        and MLflow with nested names flattened to ``a.b``."""
        self.metrics.update(metrics)
        self.log_metrics(to_flat_dict(metrics))

    def log_image(self, image: Image.Image, artifact_file: str) -> None:
        if self._mlflow is not None:
            self._guard("log image", self._mlflow.log_image, image, artifact_file)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self._mlflow is not None:
            self._guard("log artifact", self._mlflow.log_artifact, str(path), artifact_path)

    def write_metrics_file(self) -> Path:
        path = self.reports_dir / "metrics.json"
        if not self.active:
            return path
        self.reports_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.metrics, indent=2, sort_keys=True, default=str) + "\n")
        return path


@contextmanager
def stage_run(
    stage: str,
    cfg: TrackingConfig,
    params: dict[str, Any],
    reports_dir: str | Path,
    active: bool | None = None,
) -> Iterator[StageTracker]:
    """One tracked stage execution; the MLflow run is FAILED if the body raises.

    ``active`` defaults to "this is the main process" so that a multi-process stage logs once.
    """
    if active is None:
        active = int(os.environ.get("RANK", "0")) == 0
    tracker = StageTracker(stage, cfg, Path(reports_dir), active)
    tracker.start(params)
    try:
        yield tracker
    except BaseException:
        tracker.end("FAILED")
        raise
    tracker.finish("FINISHED")
