"""Shared fixtures: the tiny profile composed into a temporary folder, tracking pointed at a temporary store."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from stages.lib.config.loader import load_config
from stages.lib.config.schema import PipelineConfig

PROJECT_ROOT = Path(__file__).resolve().parents[1]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER")  # set in each worker of `pytest -n N` (make test)
if XDIST_WORKER:  # the workers share the cores: one torch thread each, in-process and in the processes they
    # start (the end-to-end `dvc repro` too; with 2 threads beside a busy worker it ran 3x slower)
    os.environ["OMP_NUM_THREADS"] = "1"


def pytest_configure(config: pytest.Config) -> None:
    if XDIST_WORKER:
        import torch

        torch.set_num_threads(1)


FIRST_MODULE = "test_pipeline_e2e.py"  # then every other module, then these in this order:
LAST_MODULES = ("test_pipeline_prior.py", "test_pipeline_experiments.py")


def _module_rank(item: pytest.Item) -> int:
    name = item.path.name
    if name == FIRST_MODULE:
        return 0
    return 2 + LAST_MODULES.index(name) if name in LAST_MODULES else 1


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The end-to-end module first, then every other module, then the prior-preservation and the experiments
    modules (each in its own order): under `pytest -n 2 --dist loadfile` one worker builds the end-to-end clone
    from the start while the other runs every other module, then the prior-preservation test, which needs the
    build only up to DreamBooth, beside the rest of the build; the experiments module uses a copy of the whole
    build."""
    items.sort(key=_module_rank)


@pytest.fixture(scope="session")
def e2e_clones(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The session's two identical end-to-end clones after `dvc repro` (tests/e2e_repo.py), built once."""
    from .e2e_repo import shared_clone

    return shared_clone(tmp_path_factory, 0), shared_clone(tmp_path_factory, 1)


@pytest.fixture(scope="session")
def e2e_clone_up_to_dreambooth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first end-to-end clone once its build has written the DreamBooth model (the build may go on); read
    it only up to there."""
    from .e2e_repo import shared_clone

    return shared_clone(tmp_path_factory, 0, up_to_dreambooth=True)


@pytest.fixture(autouse=True)
def _tracking_outside_the_project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stage run without ``tracking.uri`` logs to ``<DVC_ROOT or cwd>/mlflow.db``: every test's goes to its own
    folder, never to the project's store."""
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))


@pytest.fixture
def tiny_params(tmp_path: Path) -> Path:
    """params.yaml of the tiny profile, composed from conf/ like DVC does."""
    from stages.compose import compose  # imports DVC, which a CUDA-only test setup may lack

    return compose(tmp_path / "params.yaml", [], root=PROJECT_ROOT)


@pytest.fixture
def tiny_cfg(tiny_params: Path, tmp_path: Path) -> PipelineConfig:
    """The tiny configuration with MLflow tracking into a temporary SQLite store, without the (minutes-long)
    pretraining on the miniature world: tests of the pretraining turn it on at a small size."""
    cfg = load_config(tiny_params)
    cfg.tracking.uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    return without_pretraining(cfg)


def without_pretraining(cfg: PipelineConfig) -> PipelineConfig:
    """The tiny default left at its seeded random initialisation (no world, no attribute reader)."""
    cfg.model.tiny.pretrain.max_train_steps = 0
    cfg.model.tiny.world.reader_steps = 0
    return cfg


def untrained_base(root: Path) -> Path:
    """The tiny base model at its random initialisation, built by the base stage under ``root`` (no tracking)."""
    from stages import base
    from stages.compose import compose  # imports DVC, which a CUDA-only test setup may lack

    cfg = without_pretraining(load_config(compose(root / "params.yaml", [], root=PROJECT_ROOT)))
    cfg.tracking.enabled = False
    base.run(cfg, root / "base", root / "reports")
    return root / "base"
