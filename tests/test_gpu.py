"""CUDA paths (run on the GPU machine with `pytest -m gpu`; deselected elsewhere): bitsandbytes 8-bit AdamW,
bf16/fp16 autocast with fp32 master weights, fp16 class-image sampling."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from safetensors.torch import load_file

from stages import dreambooth, lora
from stages.lib import optim
from stages.lib.config import load_config

from .conftest import PROJECT_ROOT
from .training_fixtures import TinyWorld, build_world, tiny_training_cfg

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> TinyWorld:
    assert torch.cuda.is_available(), "the gpu tests need CUDA"
    cfg = load_config(PROJECT_ROOT / "params.yaml")
    cfg.tracking.enabled = False
    cfg.compute.device = "cuda"
    w = build_world(cfg, tmp_path_factory.mktemp("gpu"))
    tiny_training_cfg(w.cfg, steps=40)
    for train in (w.cfg.dreambooth, w.cfg.lora.train):
        train.optimizer = "adamw8bit"
        train.mixed_precision = "bf16"
    return w


@pytest.fixture
def optimizer_types(monkeypatch) -> list[str]:
    seen: list[str] = []
    real = optim.make_optimizer

    def recording(params, cfg, device):
        opt = real(params, cfg, device)
        seen.append(type(opt).__module__ + "." + type(opt).__name__)
        return opt

    monkeypatch.setattr("stages.lib.training.make_optimizer", recording)
    return seen


def test_dreambooth_bf16_adamw8bit_on_cuda(world: TinyWorld, optimizer_types: list[str]) -> None:
    out = world.root / "db"
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no 8-bit fallback on CUDA
        metrics = dreambooth.run(world.cfg, world.base_dir, out, world.paths("db"))
    assert optimizer_types and optimizer_types[0].startswith("bitsandbytes"), optimizer_types
    assert metrics["val_loss"] < 0.5 * metrics["val_loss_start"], metrics
    assert metrics["peak_memory_mb"] > 0
    weights = load_file(out / "unet/diffusion_pytorch_model.safetensors")
    assert all(t.dtype == torch.float32 for t in weights.values()), "fp32 master weights are saved"
    world.cfg.dreambooth.max_train_steps = 40  # keep for the LoRA test


def test_lora_fp16_on_cuda(world: TinyWorld, optimizer_types: list[str]) -> None:
    db = world.root / "db"
    if not db.exists():
        dreambooth.run(world.cfg, world.base_dir, db, world.paths("db"))
    cfg = copy.deepcopy(world.cfg)
    cfg.lora.train.mixed_precision = "fp16"
    metrics = lora.run(cfg, 4, db, world.root / "lora4", world.paths("lora4"))
    assert torch.isfinite(torch.tensor(metrics["final_loss"]))
    assert metrics["val_loss"] <= metrics["val_loss_start"]
    assert (world.root / "lora4" / lora.WEIGHT_NAME).is_file()


def test_infer_fp16_on_cuda_is_seeded(world: TinyWorld) -> None:
    from stages import infer

    db = world.root / "db"
    if not db.exists():
        dreambooth.run(world.cfg, world.base_dir, db, world.paths("db"))
    cfg = copy.deepcopy(world.cfg)
    cfg.lora.ranks, cfg.lora.rank = [4], 4
    if not (world.root / "lora" / "r4").exists():
        lora.run(cfg, 4, db, world.root / "lora" / "r4", world.paths("lora4b"))
    cfg.infer.prompts, cfg.infer.num_inference_steps = cfg.infer.prompts[:2], 5
    outs = []
    for name in ("a", "b"):
        paths = infer.InferPaths(world.base_dir, db, world.root / "lora", None, world.root / f"infer_{name}",
                                 world.root / f"reports_{name}")  # fmt: skip
        infer.run(cfg, paths)
        outs.append(sorted((world.root / f"infer_{name}").rglob("*.png")))
    assert outs[0] and [p.name for p in outs[0]] == [p.name for p in outs[1]]
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(*outs, strict=True)), "same seed, same images"
