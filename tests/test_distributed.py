"""Several processes on CPU (gloo) through `accelerate launch`, started by compute.num_processes: the same class
images as one process, and the same weights as one process with the same global batch."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from stages import dreambooth
from stages.lib.config.loader import save_params
from stages.lib.config.schema import ComputeConfig, PipelineConfig
from stages.lib.runtime.distributed import launch_command

from .training_fixtures import TinyWorld, new_world

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> TinyWorld:
    w = new_world(tmp_path_factory, "dist")
    w.cfg.dreambooth.max_train_steps = 6
    w.cfg.dreambooth.checkpointing_steps = 3
    w.cfg.dreambooth.num_validation_images = 0
    return w


def _params(cfg: PipelineConfig, path: Path, processes: int) -> Path:
    cfg = copy.deepcopy(cfg)
    cfg.compute.num_processes = processes
    save_params(cfg, path)
    return path


def _stage(stage: str, params: Path, *args: str) -> None:
    """``python -m stages <stage>``, as dvc.yaml runs it: with compute.num_processes > 1 it launches at once."""
    proc = subprocess.run(
        [sys.executable, "-m", "stages", stage, "--params", str(params), *args],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_launch_command_uses_accelerate_with_the_configured_processes() -> None:
    cmd = launch_command(ComputeConfig(num_processes=3), "stages.lora", ["--rank", "4"])
    assert cmd[1:3] == ["-m", "accelerate.commands.launch"] and "--multi_gpu" in cmd
    assert cmd[cmd.index("--num_processes") + 1] == "3" and cmd[-4:] == [
        "--module",
        "stages.lora",
        "--rank",
        "4",
    ]


def test_two_processes_make_the_same_class_images(world: TinyWorld, tmp_path: Path) -> None:
    """Two processes share the missing indices of a half-filled work folder (a resumed run) and write the images
    one process writes."""
    out, reports, work = tmp_path / "class2", tmp_path / "r2", tmp_path / "work2"  # work: as in dvc.yaml
    names = sorted(p.name for p in world.class_dir.glob("class_*.png"))
    kept = names[::3]  # what a killed run left, with the fingerprint of the same settings
    work.mkdir()
    for name in ["fingerprint.json", *kept]:
        shutil.copy2(world.class_dir / name, work / name)
    _stage("class_images", _params(world.cfg, tmp_path / "p.yaml", 2), "--base", str(world.base_dir),
           "--out", str(out), "--reports", str(reports), "--work", str(work))  # fmt: skip
    metrics = json.loads((reports / "metrics.json").read_text())
    assert metrics["num_processes"] == 2, metrics
    assert (metrics["num_generated"], metrics["num_reused"]) == (len(names) - len(kept), len(kept)), metrics
    assert sorted(p.name for p in out.glob("class_*.png")) == names, "no duplicated or missing index"
    for name in names:
        a = np.asarray(Image.open(out / name), dtype=np.int16)
        b = np.asarray(Image.open(world.class_dir / name), dtype=np.int16)
        assert np.abs(a - b).max() <= 1, name


def test_the_dispatcher_launches_before_importing_the_stage(world: TinyWorld, tmp_path: Path) -> None:
    """`python -m stages dreambooth` with two processes starts `accelerate launch` without importing the stage
    (torch, diffusers): the launched processes do that; this one only waits and passes their status on."""
    params = _params(world.cfg, tmp_path / "p.yaml", 2)
    script = (
        "import json, subprocess, sys\n"
        "calls = []\n"
        "subprocess.call = lambda cmd, env: calls.append(cmd) or 7\n"
        "from stages.__main__ import main\n"
        f"status = main(['dreambooth', '--params', {str(params)!r}, '--out', 'x'])\n"
        "heavy = [m for m in ('stages.dreambooth', 'diffusers', 'mlflow') if m in sys.modules]\n"
        "print(json.dumps({'status': status, 'calls': calls, 'heavy': heavy}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["status"] == 7 and result["heavy"] == [], result
    [cmd] = result["calls"]
    assert cmd[cmd.index("--num_processes") + 1] == "2", cmd
    assert cmd[cmd.index("--module") :] == [
        "--module",
        "stages",
        "dreambooth",
        "--params",
        str(params),
        "--out",
        "x",
    ]


def test_two_processes_train_like_one_with_the_same_global_batch(world: TinyWorld, tmp_path: Path) -> None:
    single = copy.deepcopy(world.cfg)
    single.dreambooth.train_batch_size = 2
    dreambooth.run(single, world.base_dir, tmp_path / "one", world.paths("one"))
    paths = world.paths("two")
    _stage("dreambooth", _params(world.cfg, tmp_path / "p.yaml", 2), "--base", str(world.base_dir),
           "--prepared", str(world.prepared), "--class-images", str(world.class_dir), "--out", str(tmp_path / "two"),
           "--checkpoints", str(paths.checkpoint_dir), "--reports", str(paths.reports_dir))  # fmt: skip
    name = "unet/diffusion_pytorch_model.safetensors"
    a, b = load_file(tmp_path / "one" / name), load_file(tmp_path / "two" / name)
    base = load_file(world.base_dir / name)
    assert any(not torch.equal(a[k], base[k]) for k in a), "training changed the weights"
    # gradients are all-reduced in another order than one process sums them; Adam normalises each update, so
    # compare the whole update, not single elements: the two runs must agree to within 1% of what training moved
    moved = sum(float((a[k] - base[k]).pow(2).sum()) for k in a) ** 0.5
    apart = sum(float((a[k] - b[k]).pow(2).sum()) for k in a) ** 0.5
    assert apart < 0.01 * moved, (apart, moved)
    assert json.loads((paths.reports_dir / "metrics.json").read_text())["steps"] == 6
