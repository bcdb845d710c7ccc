"""MLflow as a training tool: `make ui` opens the experiment in the model-training view with its headline metric
columns (stages/lib/tracking/mlflow_ui.py), and the stage runs of one `dvc repro` are children of one parent run
(stages/lib/tracking/mlflow_run.py), whether a stage logs in place or through its sidecar process."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from stages.lib.config.schema import TrackingConfig
from stages.lib.tracking import mlflow_run
from stages.lib.tracking.mlflow_run import (
    EXPERIMENT_KIND,
    PIPELINE_TAG,
    PipelineRun,
    _dvc_index,
    pipeline_run,
)
from stages.lib.tracking.mlflow_ui import APP_NAME
from stages.lib.tracking.tracker import stage_run

from .browser import chromium, grid_rows, mlflow_ui
from .conftest import PROJECT_ROOT

DVC = Path(sys.executable).with_name("dvc")
STAGE = """\
import sys
from pathlib import Path
from stages.lib.config.schema import TrackingConfig
from stages.lib.tracking.tracker import stage_run
name, uri, background = sys.argv[1], sys.argv[2], sys.argv[3] == "sidecar"
cfg = TrackingConfig(uri=uri, experiment_name="grouped", background=background)
with stage_run(name, cfg, {"x": 1}, Path("reports") / name, background=background) as tracker:
    tracker.set_final_metrics({"m": 1.0})
"""


def sh(repo: Path, *args: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT), "DVC_NO_ANALYTICS": "1"}
    done = subprocess.run(args, cwd=repo, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.slow
def test_the_stage_runs_of_one_dvc_repro_share_a_parent_run(tmp_path: Path) -> None:
    repo, uri = tmp_path / "repo", f"sqlite:///{tmp_path / 'mlflow.db'}"
    repo.mkdir()
    (repo / "stage.py").write_text(STAGE)
    stages = {
        name: {
            "cmd": f"{sys.executable} stage.py {name} {uri} {how}",
            "deps": ["stage.py"],
            "outs": [f"reports/{name}"],
        }
        for name, how in (("first", "in_place"), ("second", "sidecar"))
    }
    stages["second"]["deps"].append("reports/first")
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}))
    sh(repo, "git", "init", "-q")
    sh(repo, str(DVC), "init", "-q")
    sh(repo, str(DVC), "repro", "-q")
    sh(repo, str(DVC), "repro", "-q", "--force")
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("grouped")
    assert EXPERIMENT_KIND.items() <= experiment.tags.items()
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])
    parents = [r for r in runs if r.data.tags.get("stage") == "pipeline"]
    assert [p.info.run_name for p in parents] == ["dvc repro", "dvc repro"]
    assert all(p.info.status == "FINISHED" for p in parents)
    for parent in parents:
        children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
        assert sorted(c.data.tags["stage"] for c in children) == ["first", "second"], children
        assert {c.data.tags[PIPELINE_TAG] for c in children} == {parent.data.tags[PIPELINE_TAG]}
    assert len(runs) == 6


def test_outside_dvc_there_is_no_pipeline_run(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DVC_STAGE", raising=False)
    assert pipeline_run() is None
    monkeypatch.setenv("DVC_STAGE", "prep")  # but no dvc process above this one: still none
    assert pipeline_run() is None or "dvc" in pipeline_run().label
    assert _dvc_index(["/venv/bin/python", "/venv/bin/dvc", "repro"]) == 1
    assert _dvc_index(["dvc", "exp", "run"]) == 0 and _dvc_index(["python", "-m", "dvc", "repro"]) == 2
    assert _dvc_index(["python", "-m", "stages", "prep"]) is None


# what the stages log (final metrics; compare's per variant), with values the table shows as they are
STAGE_METRICS = {
    "prep": {"num_accepted": 24},
    "dreambooth": {"final_loss": 0.1234, "val_loss": 0.2345, "best_val_loss": 0.2301},
    "lora_r4": {"final_loss": 0.1456, "val_loss": 0.2567, "best_val_loss": 0.2489},
    "compare": {"dreambooth": {"subject_similarity": 0.6123}, "lora_r4": {"subject_similarity": 0.5876}},
}
GENAI_TABS = {"overview", "chat-sessions", "evaluation-runs", "judges", "review-queue", "playground"}


def test_make_ui_serves_the_project_app() -> None:
    recipe = re.search(r"^ui:.*\n\t(.*)$", (PROJECT_ROOT / "Makefile").read_text(), re.M)
    assert recipe and f"--app-name {APP_NAME} " in recipe.group(1), recipe
    apps = {e.name: e.value for e in entry_points(group="mlflow.app")}
    assert apps.get(APP_NAME) == "stages.lib.tracking.mlflow_ui:create_app", (
        f"the mlflow.app entry point {APP_NAME} of pyproject.toml is not installed (make setup): {apps}"
    )


@pytest.mark.slow
def test_make_ui_opens_runs_with_headline_metrics(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setattr(mlflow_run, "pipeline_run", lambda: PipelineRun("build", "dvc repro"))
    cfg = TrackingConfig(uri=uri, background=False)
    for stage, metrics in STAGE_METRICS.items():
        with stage_run(stage, cfg, {"seed": 0}, tmp_path / stage, background=False) as tracker:
            if "final_loss" in metrics:
                tracker.log_metrics({"loss": 0.5}, step=1)
            tracker.set_final_metrics(metrics)
    client = MlflowClient(uri)
    experiment_id = client.get_experiment_by_name(cfg.experiment_name).experiment_id
    runs = {r.info.run_id: r.info.run_name for r in client.search_runs([experiment_id])}
    ids = {name: run_id for run_id, name in runs.items()}
    with mlflow_ui(uri, tmp_path) as url:
        page = f"{url}/#/experiments/{experiment_id}"  # as the experiments list links it: no view in the URL
        dom = chromium(tmp_path / "profile", "--window-size=1600,900", "--dump-dom", page)
    # the model-training view: the experiment's runs, and no GenAI tab (overview, evaluations, judges...)
    tabs = set(re.findall(rf'href="#/experiments/{experiment_id}/([a-z-]+)', dom))
    assert "runs" in tabs and not tabs & GENAI_TABS, tabs
    assert "<title>Runs - " in dom and "mlflow.assistant.chat_panel" not in dom  # no assistant panel opened
    # every run a row: the parent run of the dvc invocation, expanded to its stage runs
    rows = grid_rows(dom)
    assert set(rows) == set(runs), (rows.keys(), runs)
    for run_id, name in runs.items():
        assert rows[run_id]["attributes.`Run Name`"].endswith(name), rows[run_id]
    # the headline metrics as columns, with the numbers of the runs that logged them
    assert rows[ids["dreambooth"]].get("metrics.`val_loss`") == "0.2345", rows[ids["dreambooth"]]
    assert rows[ids["lora_r4"]].get("metrics.`final_loss`") == "0.1456", rows[ids["lora_r4"]]
    assert rows[ids["compare"]].get("metrics.`lora_r4.subject_similarity`") == "0.5876", rows[ids["compare"]]
    assert rows[ids["dvc repro"]].get("metrics.`val_loss`") == "-", rows[ids["dvc repro"]]
