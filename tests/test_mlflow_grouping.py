"""MLflow as a training tool: the experiment opens in the model-training view, and the stage runs of one
`dvc repro` are children of one parent run (stages/lib/tracking/mlflow_run.py), whether a stage logs in place or through
its sidecar process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from stages.lib.tracking.mlflow_run import EXPERIMENT_KIND, PIPELINE_TAG, _dvc_index, pipeline_run

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
