"""`make ui`: MLflow's own server, whose page first fills in what MLflow's UI otherwise leaves to each browser.

MLflow 3's UI keeps its view settings in the browser's localStorage only; no server option, environment variable
or experiment tag sets them (``mlflow.experimentKind`` no longer picks the view). A browser without them opens
every experiment in the GenAI view (traces, evaluations, the assistant panel opened on first load), and a runs
table without metric columns. The page served here first writes, where the browser has no value of its own yet:

- the model-training view (runs, models; the sidebar's GenAI / model training switch, which then remembers the
  person's choice);
- the assistant panel not opened by itself (its button stays);
- per experiment of this project (tagged by stages/lib/tracking/mlflow_run.py): a runs table showing the
  headline metric columns, and each ``dvc`` invocation's parent run expanded to its stage runs (a parent run
  the person collapsed stays collapsed).

It is registered as the ``mlflow.app`` entry point ``sd-personalise`` (pyproject.toml), MLflow's way to serve a
custom app: ``mlflow ui --app-name sd-personalise``. The localStorage keys are those of MLflow 3.17's UI
(constraints.txt); tests/test_mlflow_grouping.py opens the UI as a person would and fails when they change.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from stages.lib.tracking.mlflow_run import EXPERIMENT_KIND, PARENT_TAG

APP_NAME = "sd-personalise"
WORKFLOW_KEY = "mlflow.workflowType_v1"  # "genai" (MLflow's default) or "machine_learning"
ASSISTANT_OPENED_KEY = "mlflow.assistant.fab.autoOpenedOnFirstLoad_v1"
# the runs table of one experiment: MLflow's ui state, with the column ids it uses
RUNS_TABLE_KEY = 'MLflowLocalStorage-1.1-ExperimentPage-["{}"]-ReactComponentState'
# training losses (DreamBooth, LoRA, ControlNet runs; stages/lib/training/trainer.py) and, from the newest
# compare run, the subject similarity of every variant (reports/compare/headline.json's numbers)
LOSS_METRICS = ("final_loss", "val_loss", "best_val_loss")
QUALITY_METRIC = "subject_similarity"
PARENT_RUNS = 100  # the newest parent runs expanded per experiment
SCRIPT = """<script>/* sd-personalise: MLflow UI defaults (stages/lib/tracking/mlflow_ui.py) */
(function (defaults, expanded) {
  try {
    for (const key in defaults) if (localStorage.getItem(key) === null) localStorage.setItem(key, defaults[key]);
    for (const key in expanded) {
      const state = JSON.parse(localStorage.getItem(key) || "{}");
      state.runsExpanded = Object.assign({}, expanded[key], state.runsExpanded);
      localStorage.setItem(key, JSON.stringify(state));
    }
  } catch (err) { console.warn("sd-personalise UI defaults not applied", err); }
})(__DEFAULTS__, __EXPANDED__);
</script>"""


def metric_column(key: str) -> str:
    return f"metrics.`{key}`"


def headline_columns(compare_metrics: dict[str, float]) -> list[str]:
    """The runs table's metric columns: the training losses, then every compared variant's subject similarity."""
    quality = sorted(k for k in compare_metrics if k.rpartition(".")[2] == QUALITY_METRIC)
    return [metric_column(k) for k in (*LOSS_METRICS, *quality)]


def newest_runs(store: Any, experiment_id: str, where: str, n: int) -> list[Any]:
    from mlflow.entities import ViewType

    return store.search_runs([experiment_id], where, ViewType.ACTIVE_ONLY, n, ["attributes.start_time DESC"])


def browser_defaults(store: Any) -> tuple[dict[str, str], dict[str, dict[str, bool]]]:
    """localStorage values to write where absent, and per runs table the parent runs to expand, from the
    tracking ``store`` (MLflow's AbstractStore)."""
    from mlflow.entities import ViewType

    defaults = {WORKFLOW_KEY: json.dumps("machine_learning"), ASSISTANT_OPENED_KEY: "true"}
    expanded: dict[str, dict[str, bool]] = {}
    kind = " and ".join(f"tags.`{k}` = '{v}'" for k, v in EXPERIMENT_KIND.items())
    for experiment in store.search_experiments(ViewType.ACTIVE_ONLY, 1000, kind):
        eid = experiment.experiment_id
        compare = newest_runs(store, eid, "tags.stage = 'compare'", 1)
        columns = headline_columns(compare[0].data.metrics if compare else {})
        defaults[RUNS_TABLE_KEY.format(eid)] = json.dumps({"selectedColumns": columns})
        parents = newest_runs(store, eid, f"tags.{PARENT_TAG} = 'true'", PARENT_RUNS)
        expanded[RUNS_TABLE_KEY.format(eid)] = {run.info.run_id: True for run in parents}
    return defaults, expanded


def page(index_html: str, defaults: dict[str, str], expanded: dict[str, dict[str, bool]]) -> str:
    """MLflow's index.html with the defaults script first in its head, before MLflow's own scripts."""

    def literal(value: Any) -> str:  # JSON inside <script>: no "</script>" can end it early
        return json.dumps(value).replace("<", "\\u003c")

    script = SCRIPT.replace("__DEFAULTS__", literal(defaults)).replace("__EXPANDED__", literal(expanded))
    head = index_html.index("<head>") + len("<head>")
    return index_html[:head] + script + index_html[head:]


def create_app() -> Any:
    """MLflow's server app (FastAPI over MLflow's Flask app), its page served with the defaults script."""
    from mlflow.server import app as flask_app
    from mlflow.server.fastapi_app import app
    from mlflow.server.handlers import _add_static_prefix, _get_tracking_store
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import Request
    from starlette.responses import HTMLResponse
    from starlette.routing import Route

    index = Path(flask_app.static_folder) / "index.html"

    def render() -> str:
        return page(index.read_text(), *browser_defaults(_get_tracking_store()))

    async def serve_page(request: Request) -> HTMLResponse:
        return HTMLResponse(await run_in_threadpool(render), headers={"Cache-Control": "no-cache"})

    app.router.routes.insert(0, Route(_add_static_prefix("/"), serve_page, methods=["GET"]))
    return app
