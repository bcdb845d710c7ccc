"""MLflow tracking for stage runs, written once and used by every stage.

Each stage execution is one MLflow run tagged with the stage, the git commit and the DVC experiment name; it logs
the flattened params, step metrics, image grids and the final metrics. The same final metrics always land in
``reports/<stage>/metrics.json`` for ``dvc metrics show``/``dvc exp show`` -- also when tracking fails, in which
case the failure is reported and the stage's real outputs are still written.

The MLflow calls (stages/lib/tracking/mlflow_run.py) run in a child process by default (``tracking.background``,
stages/lib/tracking/sidecar.py), so that a stage does not wait 2-3.5 s for MLflow's import; in a process that has
imported MLflow already (a notebook, the tests) they run in place.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from PIL import Image

from stages.lib.config.loader import to_flat_dict
from stages.lib.config.schema import TrackingConfig
from stages.lib.tracking.mlflow_run import (
    METRIC_BATCH,
    MetricRow,
    MlflowRun,
    git_commit,
    project_root,
    tracking_uri,
)
from stages.lib.tracking.sidecar import SidecarRun, discard_prestarted, take_prestarted

__all__ = ["StageTracker", "git_commit", "project_root", "stage_run", "tracking_uri"]
FLUSH_SECONDS = 5.0  # step metrics reach MLflow at least this often


def _finite(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and math.isfinite(float(v))}


def use_sidecar(cfg: TrackingConfig) -> bool:
    """Log from a child process: configured, and worth it (this process has not imported MLflow yet)."""
    return cfg.background and "mlflow" not in sys.modules


class StageTracker:
    """Logs to one MLflow run; every call degrades to a warning if MLflow fails."""

    def __init__(
        self,
        stage: str,
        cfg: TrackingConfig,
        reports_dir: Path,
        active: bool = True,
        background: bool | None = None,
    ) -> None:
        self.stage = stage
        self.active = active  # False in the non-main processes of a multi-process run: log and write nothing
        self.cfg = cfg
        self.background = use_sidecar(cfg) if background is None else background
        self.reports_dir = reports_dir
        self.metrics: dict[str, Any] = {}
        self.errors: list[str] = []
        self.run_id: str | None = None
        self._run: MlflowRun | SidecarRun | None = None
        self._pending: list[MetricRow] = []  # step metrics not yet written
        self._last_flush = time.monotonic()

    # -- lifecycle -------------------------------------------------------------------------------------------
    def start(self, params: dict[str, Any]) -> None:
        if not (self.cfg.enabled and self.active):
            discard_prestarted()
            return
        if self.background:
            self._run = (take_prestarted() or SidecarRun()).bind(self.stage, self.cfg)
        else:
            discard_prestarted()
            self._run = MlflowRun(self.stage, self.cfg)
        self._run.start(params)

    def finish(self, status: str) -> None:
        self.write_metrics_file()
        self.end(status)

    def end(self, status: str) -> None:
        """Write the pending step metrics and end the MLflow run with ``status``; warn about every failure."""
        if self._run is None:
            return
        self.flush()
        result, self._run = self._run.end(status), None
        self.run_id = result.run_id
        self.errors += result.errors
        for msg in result.errors:
            warnings.warn(msg, RuntimeWarning, stacklevel=3)

    # -- logging ----------------------------------------------------------------------------------------------
    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        """Step metrics (loss curves...) go to MLflow only, in batches: one write every few seconds instead of
        one per training step, which costs as much as a tiny-model step (benchmarks/train_step.py --model tiny)."""
        if self._run is None:
            return
        now = int(time.time() * 1000)
        self._pending += [(k, v, now, step or 0) for k, v in _finite(metrics).items()]
        if len(self._pending) >= METRIC_BATCH or time.monotonic() - self._last_flush >= FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        """Send the pending step metrics to MLflow."""
        pending, self._pending = self._pending, []
        self._last_flush = time.monotonic()
        if self._run is not None and pending:
            self._run.log_metrics(pending)

    def set_final_metrics(self, metrics: dict[str, Any]) -> None:
        """Final metrics: reports/<stage>/metrics.json as given (nesting kept, e.g. one object per variant)
        and MLflow with nested names flattened to ``a.b``."""
        self.metrics.update(metrics)
        self.log_metrics(to_flat_dict(metrics))

    def log_image(self, image: Image.Image, artifact_file: str) -> None:
        if self._run is not None:
            self._run.log_image(image, artifact_file)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self._run is not None:
            self._run.log_artifact(str(path), artifact_path)

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
    background: bool | None = None,
) -> Iterator[StageTracker]:
    """One tracked stage execution; the MLflow run is FAILED if the body raises.

    ``active`` defaults to "this is the main process" so that a multi-process stage logs once; ``background``
    (log from a child process) to ``use_sidecar(cfg)``.
    """
    if active is None:
        active = int(os.environ.get("RANK", "0")) == 0
    tracker = StageTracker(stage, cfg, Path(reports_dir), active, background)
    tracker.start(params)
    try:
        yield tracker
    except BaseException:
        tracker.end("FAILED")
        raise
    tracker.finish("FINISHED")
