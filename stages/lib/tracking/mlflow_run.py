"""The MLflow calls of one stage run, in whichever process makes them (the stage's own, or its tracking sidecar).

Every call is guarded: a failure is logged and collected in ``errors`` (returned by ``end``), never raised, so
tracking can never lose a stage's outputs. MLflow is imported on ``start`` only.
"""

from __future__ import annotations

import logging
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from stages.lib.config.schema import TrackingConfig

log = logging.getLogger(__name__)
METRIC_BATCH = 1000  # MLflow's limit of metrics in one log_batch call
MetricRow = tuple[str, float, int, int]  # key, value, timestamp (ms), step
# the experiment's type in MLflow (model training, not GenAI); MLflow 3.17's UI picks its view from the browser's
# settings instead, which `make ui` fills in for the experiments with this tag (stages/lib/tracking/mlflow_ui.py)
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
PIPELINE_TAG = "pipeline_run"  # the same on every stage run of one `dvc repro` / `dvc exp run`
PARENT_TAG = "pipeline_parent"


@dataclass(frozen=True)
class PipelineRun:
    """One `dvc repro` / `dvc exp run` invocation: ``key`` is unique to it, ``label`` names its parent run."""

    key: str
    label: str


def _proc(pid: int) -> tuple[int, int, list[str]] | None:
    """(parent pid, start time in clock ticks after boot, argv) of a process, from /proc (Linux); None elsewhere."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "; comm may hold spaces
    return int(fields[1]), int(fields[19]), argv


def _dvc_index(argv: list[str]) -> int | None:
    """Where ``dvc`` stands in a command line (``dvc ...``, ``python .../dvc ...``, ``python -m dvc ...``)."""
    for i, arg in enumerate(argv[:3]):
        if Path(arg).name == "dvc":
            return i
    return None


def pipeline_run() -> PipelineRun | None:
    """The `dvc repro` / `dvc exp run` this stage runs under (DVC sets DVC_STAGE; the nearest `dvc` process among
    the ancestors is the invocation), or None outside DVC or where /proc cannot tell."""
    if not os.environ.get("DVC_STAGE"):
        return None
    pid = os.getppid()
    for _ in range(8):
        info = _proc(pid)
        if info is None or pid <= 1:
            return None
        parent, started, argv = info
        at = _dvc_index(argv)
        if at is not None:
            exp = os.environ.get("DVC_EXP_NAME", "")
            words = [a for a in argv[at + 1 : at + 3] if a and not a.startswith("-")]
            label = f"dvc exp run [{exp}]" if exp else " ".join(["dvc", *(words or ["repro"])])
            return PipelineRun(f"{pid}-{started}-{exp}", label)  # a queue worker runs several experiments
        pid = parent
    return None


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


@dataclass
class RunResult:
    """What a finished MLflow run reports back: its id (None if it never started) and every tracking failure."""

    run_id: str | None = None
    errors: list[str] = field(default_factory=list)


class MlflowRun:
    """One MLflow run tagged with the stage, the git commit and the DVC experiment name."""

    def __init__(self, stage: str, cfg: TrackingConfig) -> None:
        self.stage = stage
        self.cfg = cfg
        self.result = RunResult()
        self._mlflow: Any = None

    def start(self, params: dict[str, Any]) -> None:
        """Open the run and log ``params``."""
        self._guard("start run", self._start, params)

    def _start(self, params: dict[str, Any]) -> None:
        import mlflow

        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        uri = tracking_uri(self.cfg)
        mlflow.set_tracking_uri(uri)
        experiment = mlflow.get_experiment_by_name(self.cfg.experiment_name)
        if experiment is None:
            artifact_location = None
            if uri.startswith("sqlite:///") and not self.cfg.uri:
                artifact_location = (project_root() / "mlartifacts").as_uri()
            mlflow.create_experiment(
                self.cfg.experiment_name, artifact_location=artifact_location, tags=EXPERIMENT_KIND
            )
        elif not EXPERIMENT_KIND.items() <= experiment.tags.items():
            for key, value in EXPERIMENT_KIND.items():
                mlflow.MlflowClient().set_experiment_tag(experiment.experiment_id, key, value)
        experiment_id = mlflow.set_experiment(self.cfg.experiment_name).experiment_id
        exp_name = os.environ.get("DVC_EXP_NAME", "")
        run_name = f"{self.stage}" + (f" [{exp_name}]" if exp_name else "")
        tags = {"stage": self.stage, "git_commit": git_commit(), "dvc_exp_name": exp_name}
        group = pipeline_run()
        if group is not None:  # the stage runs of one dvc invocation are children of one parent run
            tags |= {PIPELINE_TAG: group.key, "mlflow.parentRunId": self._parent(experiment_id, group, tags)}
        run = mlflow.start_run(run_name=run_name, tags=tags)
        self.result.run_id = run.info.run_id
        self._mlflow = mlflow
        # MLflow limits a param value to 6000 chars and a batch to 100 params.
        items = [(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            mlflow.log_params(dict(items[i : i + 100]))

    def _parent(self, experiment_id: str, group: PipelineRun, tags: dict[str, str]) -> str:
        """The parent run of ``group``'s stage runs: found by its tag, or created (and marked finished)."""
        import mlflow

        client = mlflow.MlflowClient()
        found = client.search_runs(
            [experiment_id],
            f"tags.{PIPELINE_TAG} = '{group.key}' and tags.{PARENT_TAG} = 'true'",
            max_results=1,
        )
        if found:
            return found[0].info.run_id
        parent_tags = {**tags, PIPELINE_TAG: group.key, PARENT_TAG: "true", "stage": "pipeline"}
        run = client.create_run(experiment_id, run_name=group.label, tags=parent_tags)
        client.set_terminated(run.info.run_id, "FINISHED")
        return run.info.run_id

    def log_metrics(self, rows: list[MetricRow]) -> None:
        """Write metric rows in batches of MLflow's limit."""
        if self._mlflow is None:
            return
        from mlflow.entities import Metric

        client = self._mlflow.MlflowClient()
        metrics = [Metric(key, value, timestamp, step) for key, value, timestamp, step in rows]
        for i in range(0, len(metrics), METRIC_BATCH):
            self._guard(
                "log metrics", client.log_batch, self.result.run_id, metrics=metrics[i : i + METRIC_BATCH]
            )

    def log_image(self, image: Image.Image, artifact_file: str) -> None:
        if self._mlflow is not None:
            self._guard("log image", self._mlflow.log_image, image, artifact_file)

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None:
        if self._mlflow is not None:
            self._guard("log artifact", self._mlflow.log_artifact, path, artifact_path)

    def end(self, status: str) -> RunResult:
        """End the run with ``status`` (FINISHED, FAILED, KILLED); returns the id and the failures."""
        if self._mlflow is not None:
            self._guard("end run", self._mlflow.end_run, status)
            self._mlflow = None
        return self.result

    def _guard(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> None:
        try:
            fn(*args, **kwargs)
        except Exception as err:  # tracking must never lose the stage's outputs
            msg = f"MLflow tracking failed ({what}) for stage '{self.stage}': {err}"
            self.result.errors.append(msg)
            log.warning(msg)
