"""The shared MLflow helper: one tagged run per stage; tracking failures never lose outputs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.entities import Run
from mlflow.tracking import MlflowClient
from PIL import Image

from stages.lib.config.schema import TrackingConfig
from stages.lib.tracking.sidecar import SidecarRun
from stages.lib.tracking.tracker import stage_run, tracking_uri

from .conftest import PROJECT_ROOT

IN_PLACE_AND_SIDECAR = pytest.mark.parametrize("background", [False, True], ids=["in_place", "sidecar"])


@pytest.fixture(scope="module")
def store_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One SQLite store for the module (creating its tables takes ~2 s); each test logs to its own experiment."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'm.db'}"


@pytest.fixture
def store(store_uri: str, request: pytest.FixtureRequest) -> TrackingConfig:
    return TrackingConfig(uri=store_uri, experiment_name=request.node.name)


def only_run(cfg: TrackingConfig) -> tuple[MlflowClient, Run]:
    """The one run of ``cfg``'s experiment, and a client of its store."""
    client = MlflowClient(cfg.uri)
    (run,) = client.search_runs([client.get_experiment_by_name(cfg.experiment_name).experiment_id])
    return client, run


@IN_PLACE_AND_SIDECAR
def test_run_logs_params_metrics_image_and_tags(
    tmp_path: Path, monkeypatch, background: bool, store: TrackingConfig
) -> None:
    monkeypatch.setenv("DVC_EXP_NAME", "exp-abc")
    cfg = store
    params = {"a.b": 1, "lr": 2e-6}
    with stage_run("demo", cfg, params, tmp_path / "reports", background=background) as tracker:
        tracker.log_metrics({"loss": 1.0}, step=1)
        tracker.log_metrics({"loss": 0.5}, step=2)
        tracker.log_image(Image.new("RGB", (8, 8), "red"), "grids/x.png")
        tracker.set_final_metrics({"score": 0.75, "skipped": float("nan")})
        params["lr"] = 1.0  # changed after the call: the run keeps what was logged
    client, run = only_run(cfg)
    assert tracker.run_id == run.info.run_id and run.info.status == "FINISHED"
    assert run.data.tags["stage"] == "demo" and run.data.tags["dvc_exp_name"] == "exp-abc"
    assert run.data.tags["git_commit"] and run.info.run_name == "demo [exp-abc]"
    assert run.data.params == {"a.b": "1", "lr": "2e-06"}
    assert [m.value for m in client.get_metric_history(run.info.run_id, "loss")] == [1.0, 0.5]
    assert run.data.metrics["score"] == 0.75 and "skipped" not in run.data.metrics
    assert [a.path for a in client.list_artifacts(run.info.run_id, "grids")] == ["grids/x.png"]
    assert json.loads((tmp_path / "reports" / "metrics.json").read_text())["score"] == 0.75


@IN_PLACE_AND_SIDECAR
def test_broken_tracking_warns_and_still_writes_metrics(tmp_path: Path, background: bool) -> None:
    cfg = TrackingConfig(uri="unknownscheme://nowhere", experiment_name="t")
    with pytest.warns(RuntimeWarning, match="MLflow tracking failed"):
        with stage_run("demo", cfg, {"x": 1}, tmp_path / "reports", background=background) as tracker:
            tracker.log_image(Image.new("RGB", (4, 4)), "g.png")
            tracker.set_final_metrics({"score": 1.0})
            (tmp_path / "output.txt").write_text("real output")
    assert tracker.errors and (tmp_path / "output.txt").is_file()
    assert json.loads((tmp_path / "reports" / "metrics.json").read_text()) == {"score": 1.0}


@IN_PLACE_AND_SIDECAR
def test_failed_stage_marks_run_failed_and_keeps_its_step_metrics(
    tmp_path: Path, background: bool, store: TrackingConfig
) -> None:
    cfg = store
    with pytest.raises(ValueError, match="boom"):
        with stage_run("demo", cfg, {}, tmp_path / "reports", background=background) as tracker:
            tracker.log_metrics({"loss": 0.3}, step=7)  # still buffered when the stage fails
            raise ValueError("boom")
    client, run = only_run(cfg)
    assert run.info.status == "FAILED"
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss")] == [(7, 0.3)]


def test_step_metrics_are_batched_and_all_arrive_in_order(tmp_path: Path, store: TrackingConfig) -> None:
    """More metrics than one MLflow batch holds (1000): every step arrives, in order, with its step number."""
    cfg = store
    with stage_run("demo", cfg, {}, tmp_path / "reports") as tracker:
        for step in range(1, 701):
            tracker.log_metrics({"loss": 1.0 / step, "lr": 1e-4}, step=step)
        assert len(tracker._pending) < 2 * 700  # flushed once the batch limit was reached
    client, run = only_run(cfg)
    history = sorted(client.get_metric_history(run.info.run_id, "loss"), key=lambda m: m.step)
    assert [m.step for m in history] == list(range(1, 701))
    assert [m.value for m in history] == [1.0 / s for s in range(1, 701)]
    assert len(client.get_metric_history(run.info.run_id, "lr")) == 700


def test_default_uri_is_sqlite_at_dvc_root(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    assert tracking_uri(TrackingConfig()) == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    assert tracking_uri(TrackingConfig(uri="http://127.0.0.1:5000")) == "http://127.0.0.1:5000"


def test_disabled_tracking_writes_only_metrics(tmp_path: Path) -> None:
    with stage_run("demo", TrackingConfig(enabled=False), {}, tmp_path / "r") as tracker:
        tracker.set_final_metrics({"a": 1.0})
    assert tracker.run_id is None and json.loads((tmp_path / "r" / "metrics.json").read_text()) == {"a": 1.0}


def test_nested_final_metrics_keep_nesting_in_file_and_flatten_in_mlflow(
    tmp_path: Path, store: TrackingConfig
) -> None:
    cfg = store
    with stage_run("demo", cfg, {}, tmp_path / "r") as tracker:
        tracker.set_final_metrics({"dreambooth": {"score": 0.5}, "base": {"score": 0.1}})
    assert json.loads((tmp_path / "r" / "metrics.json").read_text())["dreambooth"] == {"score": 0.5}
    client, run = only_run(cfg)
    assert run.data.metrics == {"dreambooth.score": 0.5, "base.score": 0.1}


def test_sidecar_ends_the_run_as_killed_when_the_stage_process_vanishes(
    tmp_path: Path, store: TrackingConfig
) -> None:
    cfg = store
    sidecar = SidecarRun().bind("demo", cfg)
    sidecar.start({"x": 1})
    sidecar.log_metrics([("loss", 0.5, 0, 3)])
    sidecar.close()  # the pipe closes without an `end` call, as when the stage is killed
    assert sidecar._proc.wait(timeout=60) == 0
    sidecar._proc.stdout.close()
    client, run = only_run(cfg)
    assert run.info.status == "KILLED" and run.data.metrics == {"loss": 0.5}


def test_stage_process_never_imports_mlflow_with_the_sidecar(tmp_path: Path, store: TrackingConfig) -> None:
    """The point of the sidecar: a stage's own process logs a complete run without importing MLflow."""
    script = f"""
import sys
from PIL import Image
from stages.lib.config.schema import TrackingConfig
from stages.lib.tracking.tracker import stage_run
cfg = TrackingConfig(uri="{store.uri}", experiment_name="{store.experiment_name}")
with stage_run("demo", cfg, {{"x": 1}}, "{tmp_path / "reports"}") as tracker:
    tracker.log_metrics({{"loss": 0.25}}, step=1)
    tracker.log_image(Image.new("RGB", (4, 4), "blue"), "g.png")
    tracker.set_final_metrics({{"score": 2.0}})
assert tracker.background and tracker.run_id and not tracker.errors
print("mlflow imported:", "mlflow" in sys.modules)
"""
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert "mlflow imported: False" in out.stdout
    client, run = only_run(store)
    assert run.info.status == "FINISHED" and run.data.metrics == {"loss": 0.25, "score": 2.0}
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["g.png"]
