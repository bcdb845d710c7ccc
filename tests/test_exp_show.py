"""`dvc exp show` and `dvc metrics show` readable in 200 columns: the headline metrics file of compare and
stages/lib/tracking/exp_show.py (the params that vary, the headline metrics, nothing else)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from stages.compare import headline
from stages.lib.tracking import exp_show
from tests.conftest import PROJECT_ROOT

DVC = Path(sys.executable).with_name("dvc")
STAGE = """\
import json, pathlib, yaml
p = yaml.safe_load(open("params.yaml"))
rate = p["train"]["learning_rate"]
out = pathlib.Path("reports/compare"); out.mkdir(parents=True, exist_ok=True)
(out / "headline.json").write_text(json.dumps({"db_similarity": rate * 10, "lora_similarity": rate * 20}))
noisy = {f"noisy_metric_{i}": rate * i for i in range(40)} | {"nested": {"deep_metric": rate}}
(out / "metrics.json").write_text(json.dumps(noisy))
"""
PARAMS = {  # one section with many keys that never change, as the project's params.yaml has
    "train": {"learning_rate": 0.001, "steps": 10},
    "wide": {f"constant_setting_number_{i}": i for i in range(60)} | {"list": [1, 2]},
}
DVC_YAML = {
    "stages": {
        "train": {
            "cmd": "python stage.py",
            "deps": ["stage.py"],
            "params": ["train", "wide"],
            "metrics": [
                {"reports/compare/headline.json": {"cache": False}},
                {"reports/compare/metrics.json": {"cache": False}},
            ],
        }
    }
}


def run(repo: Path, *args: str) -> str:
    env = {**os.environ, "COLUMNS": "200", "DVC_NO_ANALYTICS": "1"}
    done = subprocess.run(args, cwd=repo, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@pytest.fixture
def experiments(tmp_path: Path) -> Path:
    """A git + DVC repo with two experiments that differ in one of 63 params."""
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "stage.py").write_text(STAGE)
    (repo / "params.yaml").write_text(yaml.safe_dump(PARAMS))
    (repo / "dvc.yaml").write_text(yaml.safe_dump(DVC_YAML))
    run(repo, "git", "init", "-q")
    run(repo, "git", "config", "user.email", "t@example.com")
    run(repo, "git", "config", "user.name", "t")
    run(repo, str(DVC), "init", "-q")
    run(repo, str(DVC), "repro", "-q")
    run(repo, "git", "add", "-A")
    run(repo, "git", "commit", "-qm", "baseline")
    for rate in ("0.002", "0.004"):
        run(repo, str(DVC), "exp", "run", "-q", "-S", f"train.learning_rate={rate}")
    return repo


@pytest.mark.slow
def test_exp_show_narrowed_fits_200_columns(experiments: Path) -> None:
    plain = run(experiments, str(DVC), "exp", "show", "--no-pager")
    assert "…" in plain  # plain exp show: 63 params and 43 metrics squeezed into 200 columns
    table = run(experiments, *exp_show.command(["--no-pager"], root=experiments))
    lines = table.splitlines()
    assert max(map(len, lines)) <= 200, table
    header = " ".join(lines[:3])
    for column in ("Experiment", "train.learning_rate", "db_similarity", "lora_similarity"):
        assert column in header, table
    for column in ("noisy_metric", "deep_metric", "constant_setting", "train.steps", "stage.py"):
        assert column not in table, table
    assert "0.004" in table and "0.04" in table  # the varying param and a headline value of an experiment


def test_every_param_is_kept_and_every_other_column_dropped() -> None:
    import re

    params = list(exp_show.flat_keys(yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())))
    assert "dreambooth.learning_rate" in params and len(params) > 100
    args = exp_show.exp_show_args(params, exp_show.HEADLINE_DEFAULT)
    keep, drop = re.compile(args[args.index("--keep") + 1]), re.compile(args[args.index("--drop") + 1])
    assert not any(drop.match(p) for p in params)
    others = [
        "dreambooth.subject_similarity",
        "reports/dreambooth/metrics.json:val_loss",
        "edge_f1_gain",
        "models/base",
    ]
    assert all(drop.match(c) and not keep.match(c) for c in others)
    for name in (
        *exp_show.HEADLINE_DEFAULT,
        "reports/compare/headline.json:db_similarity",
        "Experiment",
        "Created",
    ):
        assert keep.match(name), name


def test_headline_holds_dreambooth_and_the_featured_lora() -> None:
    metrics = {
        "base": {"subject_similarity": 0.5, "subject_rate": 0.0},
        "dreambooth": {"subject_similarity": 0.64, "subject_rate": 0.25, "diversity": 0.45},
        "lora_r4": {"subject_similarity": 0.6, "subject_rate": 0.2},
        "lora_r8": {"subject_similarity": 0.7},
    }
    assert headline(metrics, "lora_r4") == {
        "db_similarity": 0.64, "db_subject_rate": 0.25, "lora_similarity": 0.6, "lora_subject_rate": 0.2,
    }  # fmt: skip
    assert set(headline(metrics, None)) == {"db_similarity", "db_subject_rate"}
    assert set(exp_show.HEADLINE_DEFAULT) == set(headline(metrics, "lora_r4"))


def test_the_headline_file_is_a_declared_metrics_file() -> None:
    stages = yaml.safe_load((PROJECT_ROOT / "dvc.yaml").read_text())["stages"]
    declared = [next(iter(m)) if isinstance(m, dict) else m for m in stages["compare"]["metrics"]]
    assert str(exp_show.HEADLINE_FILE) in declared
    assert json.dumps(exp_show.headline_names(Path("/nonexistent"))) == json.dumps(
        list(exp_show.HEADLINE_DEFAULT)
    )


def test_stages_list_the_params_they_read() -> None:
    """Only keys a stage reads (fewer columns, no rerun for a key it ignores): the photo folder's name is prep's
    command argument, not a param of the training stages; prep reads the instance token (captions)."""
    stages = yaml.safe_load((PROJECT_ROOT / "dvc.yaml").read_text())["stages"]
    listed = {
        name: stage.get("params", stage.get("do", {}).get("params", [])) for name, stage in stages.items()
    }
    for name in ("dreambooth", "lora", "convert"):
        assert "data" not in listed[name] and "data.instance_dir" not in listed[name], listed[name]
        assert {"data.instance_prompt", "data.class_prompt"} <= set(listed[name]), listed[name]
    assert "data.instance_token" in listed["prep"]
