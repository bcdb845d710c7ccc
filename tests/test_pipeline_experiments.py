"""End to end, DVC experiments: a queued `lora.rank` experiment on a copy of the end-to-end clone (conftest's
``e2e_clones``), so that it can run on the second pytest worker beside test_pipeline_e2e.py."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from .e2e_repo import sh

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def repo(e2e_clones: tuple[Path, Path]) -> Path:
    """The second copy of the session's end-to-end clone: this module's experiments change it."""
    return e2e_clones[1]


def _experiments(node: object) -> Iterator[dict]:
    """Every experiment record (name + params + metrics) in `dvc exp show --json` output."""
    if isinstance(node, dict):
        if "name" in node and isinstance(node.get("data"), dict) and "params" in node["data"]:
            yield node
        for value in node.values():
            yield from _experiments(value)
    elif isinstance(node, list):
        for value in node:
            yield from _experiments(value)


def test_queued_rank_experiment_lists_params_and_compare_metrics(repo: Path) -> None:
    """A queued experiment for rank 4 (the workspace has the default 24; test_pipeline_e2e.py switches to 8 in the
    workspace), run by `dvc queue start`: `dvc exp show` lists it and the workspace with their params and compare
    metrics, the experiment ran only the stages the rank changes (class images included: an ordinary output,
    restored from the run-cache), and its MLflow compare run is tagged with its experiment name. One experiment:
    each costs ~70 s here, most of it DVC's and the stages' start-up."""
    sh(repo, "dvc", "exp", "run", "--queue", "-S", "lora.rank=4")
    sh(repo, "dvc", "queue", "start")
    deadline = time.time() + 900
    while time.time() < deadline:
        status = sh(repo, "dvc", "queue", "status").stdout
        if not re.search(r"\b(Queued|Running)\b", status):
            break
        time.sleep(3)
    assert "Failed" not in status, status
    experiments = list(_experiments(json.loads(sh(repo, "dvc", "exp", "show", "--json").stdout)))
    # rank -> (name, compare metrics) of a row that has them: for rank 24 the workspace row has metrics, the git
    # commit's row (nothing committed) has none
    by_rank: dict[int, tuple[str, dict]] = {}
    for exp in experiments:
        rank = exp["data"]["params"]["params.yaml"]["data"]["lora"]["rank"]
        metrics = exp["data"].get("metrics", {}).get("reports/compare/metrics.json", {}).get("data", {})
        if metrics or rank not in by_rank:
            by_rank[rank] = (exp["name"], metrics)
    assert {4, 24} <= set(by_rank), by_rank.keys()
    for rank in (4, 24):
        name, metrics = by_rank[rank]
        assert f"lora_r{rank}" in metrics and "dreambooth" in metrics, (rank, metrics.keys())
    # the experiment reruns only what the rank changes; the rest comes from the run-cache
    logs = sh(repo, "dvc", "queue", "logs", by_rank[4][0]).stdout
    ran = set(re.findall(r"Running stage '([^']+)'", logs))
    assert "compare" in ran and not ran & {"base", "class_images", "dreambooth", "lora@4", "infer"}, ran
    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("sd-personalise")
    tagged = {
        r.data.tags.get("dvc_exp_name")
        for r in client.search_runs([experiment.experiment_id], "tags.stage = 'compare'")
    }
    assert by_rank[4][0] in tagged, tagged
