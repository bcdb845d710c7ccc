"""End to end: a copy of the project in a fresh git repo runs `dvc repro` on the tiny default, offline."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from .conftest import PROJECT_ROOT

pytestmark = pytest.mark.slow
VENV_BIN = Path(sys.executable).parent
STAGE_RUNS = {"base", "prep", "class_images", "dreambooth", "lora_r4", "lora_r8", "lora_r24"}


def _sh(cwd: Path, *cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}", "HF_HUB_OFFLINE": "1"}
    env.pop("DVC_ROOT", None)
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=1200)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
        )
    return proc


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh git repo holding exactly what a clone of the project holds, after `dvc repro`."""
    root = tmp_path_factory.mktemp("clone")
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    for name in files:
        if (PROJECT_ROOT / name).is_file():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(PROJECT_ROOT / name, root / name)
    _sh(root, "git", "init", "-q")
    _sh(root, "git", "add", "-A")
    _sh(root, "git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "clone")
    _sh(root, "dvc", "repro")
    return root


def test_repro_writes_every_stage_output(repo: Path) -> None:
    manifest = json.loads((repo / "data/prepared/manifest.json").read_text())
    assert len(manifest["images"]) >= 20 and manifest["resolution"] == 64
    assert sum(e["method"] == "face" for e in manifest["images"]) >= 0.8 * len(manifest["images"])
    assert (repo / "reports/prep/contact_sheet.png").is_file()
    assert (repo / "models/base/model_index.json").is_file()
    assert len(list((repo / "data/class_images").glob("class_*.png"))) == 16
    assert (repo / "models/dreambooth/unet/diffusion_pytorch_model.safetensors").is_file()
    for rank in (4, 8, 24):
        assert (repo / f"models/lora/r{rank}/pytorch_lora_weights.safetensors").is_file()
    db = json.loads((repo / "reports/dreambooth/metrics.json").read_text())
    assert db["val_loss"] < db["val_loss_start"]
    metrics = _sh(repo, "dvc", "metrics", "show", "--json").stdout
    assert "reports/dreambooth/metrics.json" in metrics and "num_accepted" in metrics


def test_mlflow_has_one_tagged_run_per_stage(repo: Path) -> None:
    commit = _sh(repo, "git", "rev-parse", "HEAD").stdout.strip()
    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("sd-personalise")
    runs = client.search_runs([experiment.experiment_id])
    by_stage = {r.data.tags["stage"]: r for r in runs}
    assert STAGE_RUNS <= set(by_stage), set(by_stage)
    assert all(r.data.tags["git_commit"] == commit and r.info.status == "FINISHED" for r in runs)
    prep = by_stage["prep"]
    assert prep.data.params["prep.resolution"] == "64" and prep.data.metrics["num_accepted"] >= 20
    artifacts = [a.path for a in client.list_artifacts(prep.info.run_id, "prep")]
    assert "prep/contact_sheet.png" in artifacts, artifacts
    history = client.get_metric_history(by_stage["dreambooth"].info.run_id, "loss")
    assert len(history) == 60


def test_second_repro_is_up_to_date_and_rank_switch_retrains_nothing(repo: Path) -> None:
    assert "up to date" in _sh(repo, "dvc", "repro").stdout
    out = _sh(repo, "dvc", "exp", "run", "-S", "lora.rank=8")
    assert "Running stage" not in out.stdout or "lora@" not in out.stdout, out.stdout


def test_mistyped_override_fails_before_anything_runs(repo: Path) -> None:
    proc = _sh(repo, "dvc", "exp", "run", "-S", "lora.rnak=8", check=False)
    assert proc.returncode != 0
    assert "rnak" in proc.stdout + proc.stderr
