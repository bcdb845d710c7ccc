"""Stage logs carry no warning a user can do nothing about, each remaining warning once, and progress bars that
refresh sparingly when stderr is a file (stages/lib/runtime/quiet.py); the validation grids they log are large enough to
see. The stages run as DVC runs them, stderr to a file."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest
from PIL import Image

from stages.lib.config.loader import save_params
from stages.lib.imaging.images import VIEW_CELL
from stages.lib.runtime import quiet

from .conftest import PROJECT_ROOT
from .training_fixtures import TinyWorld, new_world

UNACTIONABLE = (
    "requires torchvision",  # transformers' image-processor fallback
    "No LoRA keys associated to CLIPTextModel",  # diffusers, for a UNet-only LoRA
    "Editable installation",  # setuptools' banner (pip install -e)
    "warnings.warn(",  # a Python warning printed with its source line
)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> TinyWorld:
    return new_world(tmp_path_factory, "quiet")


def run_stage(world: TinyWorld, name: str, *args: str) -> str:
    """Run ``python -m stages <name>`` with stderr into a file (not a terminal); its stderr."""
    log = world.root / f"{name}.log"
    env = {k: v for k, v in os.environ.items() if k != "TQDM_MININTERVAL"} | {"PYTHONPATH": str(PROJECT_ROOT)}
    with log.open("w") as stderr:
        done = subprocess.run(
            [sys.executable, "-m", "stages", name, "--params", str(world.root / "quiet.yaml"), *args],
            cwd=world.root, env=env, stdout=subprocess.DEVNULL, stderr=stderr, timeout=600,
        )  # fmt: skip
    text = log.read_text()
    assert done.returncode == 0, text[-3000:]
    return text


def test_stage_logs_are_quiet(world: TinyWorld) -> None:
    cfg = world.cfg
    cfg.lora.ranks, cfg.lora.rank = [4], 4
    cfg.lora.train.optimizer = "adamw8bit"  # on a CPU: falls back to torch AdamW, with one warning
    save_params(cfg, world.root / "quiet.yaml")
    lora_dir = world.root / "models" / "lora"
    paths = ["--prepared", str(world.prepared), "--class-images", str(world.class_dir)]
    lora = run_stage(world, "lora", "--rank", "4", "--dreambooth", str(world.base_dir), *paths,
                     "--out", str(lora_dir / "r4"), "--checkpoints", str(world.root / "ckpt" / "r4"),
                     "--reports", str(world.root / "reports" / "lora"))  # fmt: skip
    convert = run_stage(world, "convert", "--base", str(world.base_dir), "--dreambooth", str(world.base_dir),
                        "--lora-root", str(lora_dir), "--out", str(world.root / "models" / "export"),
                        "--reports", str(world.root / "reports" / "convert"))  # fmt: skip
    for log in (lora, convert):
        found = [line for line in log.splitlines() if any(words in line for words in UNACTIONABLE)]
        assert found == [], found
    fallbacks = [line for line in lora.splitlines() if "falling back to torch.optim.AdamW" in line]
    assert len(fallbacks) == 1 and fallbacks[0].startswith("WARNING RuntimeWarning: optimizer=adamw8bit"), (
        lora
    )
    # a progress bar draws its start and its end (the run takes less than LOG_PROGRESS_INTERVAL)
    refreshes = [part for part in lora.replace("\r", "\n").splitlines() if part.startswith("train:")]
    assert 1 <= len(refreshes) <= 3, refreshes
    # the validation grid (64 px samples of the tiny model) is enlarged to cells one can see in MLflow
    with Image.open(world.root / "reports" / "lora" / "validation" / "step-000030.png") as grid:
        assert grid.size == (VIEW_CELL * cfg.lora.train.num_validation_images, VIEW_CELL)


def test_the_filters_drop_only_what_they_name(caplog: pytest.LogCaptureFixture) -> None:
    quiet.install()
    quiet.install()  # idempotent: one filter per logger
    for name, words in quiet.DROPPED.items():
        logger = logging.getLogger(name)
        assert [f for f in logger.filters if isinstance(f, type(quiet._FILTER))] == [quiet._FILTER]
        with caplog.at_level(logging.WARNING, logger=name):
            logger.warning("`X` %s `XPil`", words)
            logger.warning("something else from %s", name)
    assert [r.getMessage() for r in caplog.records] == [
        f"something else from {name}" for name in quiet.DROPPED
    ]
    assert quiet.one_line_warning("m", RuntimeWarning, "f.py", 3) == "WARNING RuntimeWarning: m\n"
