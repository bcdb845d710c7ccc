"""Each optional training feature changes what it should, and nothing when it is off."""

from __future__ import annotations

import copy
import csv
import sys
import warnings
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler
from safetensors.torch import load_file

from stages import dreambooth
from stages.lib.config.schema import TrainConfig
from stages.lib.training.data import face_weight_maps
from stages.lib.training.losses import min_snr_weights, sample_noise
from stages.lib.training.optim import make_optimizer

from .training_fixtures import TinyWorld, new_world, tiny_training_cfg

UNET = "unet/diffusion_pytorch_model.safetensors"
TEXT = "text_encoder/model.safetensors"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> TinyWorld:
    w = new_world(tmp_path_factory, "options")
    tiny_training_cfg(w.cfg, steps=10)
    return w


def train(world: TinyWorld, name: str, **options) -> tuple[dict[str, float], list[dict[str, str]], Path]:
    cfg = copy.deepcopy(world.cfg)
    for key, value in options.items():
        setattr(cfg.dreambooth, key, value)
    out = world.root / "models" / name
    metrics = dreambooth.run(cfg, world.base_dir, out, world.paths(name))
    rows = list(csv.DictReader((world.paths(name).reports_dir / "loss.csv").open()))
    return metrics, rows, out


@pytest.fixture(scope="module")
def baseline(world):
    return train(world, "baseline")


def _weights(folder: Path, name: str = UNET) -> dict[str, torch.Tensor]:
    return load_file(folder / name)


def _distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return sum(float((a[k] - b[k]).pow(2).sum()) for k in a) ** 0.5


# -- the loss options, at the first step (same seed, same weights: only the option differs) ----------------------
def test_face_weighting_changes_instance_term_only(world, baseline) -> None:
    _, rows, _ = train(world, "face", face_loss_weight=4.0)
    first, base_first = rows[0], baseline[1][0]
    assert first["prior_loss"] == base_first["prior_loss"], "the prior term must stay unmasked"
    assert first["instance_loss"] != base_first["instance_loss"]


@pytest.mark.parametrize(("option", "value"), [("snr_gamma", 5.0), ("noise_offset", 0.1)])
def test_snr_and_offset_noise_change_both_terms(world, baseline, option: str, value: float) -> None:
    _, rows, _ = train(world, option, **{option: value})
    pairs = list(zip(rows, baseline[1], strict=True))
    # min-SNR only reweights timesteps whose SNR exceeds gamma, so compare the whole (short) run
    assert any(r["instance_loss"] != b["instance_loss"] for r, b in pairs)
    assert any(r["prior_loss"] != b["prior_loss"] for r, b in pairs)
    assert all(torch.isfinite(torch.tensor(float(r["loss"]))) for r in rows)


def test_min_snr_weights_are_one_when_off_and_cap_low_noise_steps() -> None:
    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    t = torch.tensor([1, 100, 500, 999])
    assert torch.equal(min_snr_weights(sched, t, 0.0), torch.ones(4))
    w = min_snr_weights(sched, t, 5.0)
    assert w[0] < 0.01 and w[-1] == 1.0 and torch.all(w[:-1] <= w[1:])


def test_offset_noise_is_plain_noise_when_off_and_shifts_channel_means_when_on() -> None:
    shape = (64, 4, 8, 8)
    plain = sample_noise(shape, torch.Generator().manual_seed(0), 0.0)
    assert torch.equal(plain, torch.randn(shape, generator=torch.Generator().manual_seed(0)))
    shifted = sample_noise(shape, torch.Generator().manual_seed(0), 0.5)
    assert shifted.mean(dim=(2, 3)).std() > 2 * plain.mean(dim=(2, 3)).std()


def test_face_maps_weight_the_box_and_keep_mean_one() -> None:
    maps = face_weight_maps([(0, 0, 32, 32), None], pixel_size=64, latent_size=16, weight=3.0)
    assert maps[0, 0, :8, :8].mean() > maps[0, 0, 8:, 8:].mean()
    assert torch.allclose(maps.mean(dim=(1, 2, 3)), torch.ones(2))
    assert torch.equal(face_weight_maps([(0, 0, 32, 32)], 64, 16, 1.0), torch.ones(1, 1, 16, 16))


# -- weights ---------------------------------------------------------------------------------------------------
def test_ema_weights_lag_behind_the_trained_weights(world, baseline) -> None:
    _, _, out = train(world, "ema", use_ema=True, ema_decay=0.9)
    base = _weights(world.base_dir)
    assert _distance(_weights(out), base) < _distance(_weights(baseline[2]), base)


def test_text_encoder_trains_only_when_asked(world, baseline) -> None:
    base_text = _weights(world.base_dir, TEXT)
    assert all(torch.equal(base_text[k], v) for k, v in _weights(baseline[2], TEXT).items())
    _, _, out = train(world, "text", train_text_encoder=True)
    assert _distance(_weights(out, TEXT), base_text) > 0


@pytest.mark.parametrize("optimizer", ["adamw", "prodigy"])
def test_optimizers_train(world, optimizer: str) -> None:
    lr = 1.0 if optimizer == "prodigy" else 1e-3
    metrics, _, out = train(world, f"opt_{optimizer}", optimizer=optimizer, learning_rate=lr)
    assert metrics["val_loss"] < metrics["val_loss_start"]
    assert _distance(_weights(out), _weights(world.base_dir)) > 0


def test_adamw8bit_falls_back_on_cpu_with_a_warning(world) -> None:
    with pytest.warns(RuntimeWarning, match="falling back to torch.optim.AdamW"):
        metrics, _, _ = train(world, "opt_8bit", optimizer="adamw8bit")
    assert metrics["steps"] == 10


def test_adamw8bit_on_cuda_without_bitsandbytes_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    """bitsandbytes is the `cuda` extra: a CUDA run without it says how to install it, then trains on."""
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` raises ImportError
    params = [torch.nn.Parameter(torch.randn(3))]
    with pytest.warns(RuntimeWarning, match=r"bitsandbytes is not installed: pip install -e '\.\[cuda\]'"):
        optimizer = make_optimizer(params, TrainConfig(optimizer="adamw8bit"), torch.device("cuda"))
    assert type(optimizer) is torch.optim.AdamW


@pytest.mark.parametrize("optimizer", ["adamw", "adamw8bit"])
def test_torch_adamw_is_fused_on_cpu(optimizer: str) -> None:
    """One fused kernel per step instead of one per tensor (5x faster on the tiny model), same updates."""
    cfg = TrainConfig(optimizer=optimizer, learning_rate=1e-2)
    weights = [torch.randn(3, 4), torch.randn(5)]
    fused_params = [torch.nn.Parameter(w.clone()) for w in weights]
    plain_params = [torch.nn.Parameter(w.clone()) for w in weights]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the 8-bit fallback's warning
        fused = make_optimizer(fused_params, cfg, torch.device("cpu"))
    plain = torch.optim.AdamW(
        plain_params, **{k: fused.defaults[k] for k in ("lr", "betas", "eps", "weight_decay")}
    )
    assert fused.defaults["fused"] is True
    for _ in range(3):
        for params, opt in ((fused_params, fused), (plain_params, plain)):
            for p in params:
                p.grad = p.detach() * 0.5 + 1.0
            opt.step()
    for a, b in zip(fused_params, plain_params, strict=True):
        torch.testing.assert_close(a, b)


def test_holdout_validation_reports_best_step(world, baseline) -> None:
    metrics, _, _ = train(world, "holdout", validation_holdout=2, validation_steps=5)
    assert metrics["val_loss_start"] != baseline[0]["val_loss_start"], (
        "probes must come from the held-out images"
    )
    assert metrics["best_val_step"] in (5.0, 10.0)
    assert metrics["best_val_loss"] <= metrics["val_loss"]


def test_gradient_checkpointing_trains_the_same_steps(world, baseline) -> None:
    metrics, rows, _ = train(world, "checkpointing", gradient_checkpointing=True)
    first, base_first = float(rows[0]["loss"]), float(baseline[1][0]["loss"])
    assert abs(first - base_first) < 1e-5 * max(1.0, abs(base_first)), (
        "recomputation must not change the loss"
    )
    assert metrics["steps"] == baseline[0]["steps"]
