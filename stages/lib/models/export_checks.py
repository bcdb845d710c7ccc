"""Checks that an exported model computes what its source computes: a fixed UNet probe, weight differences and
LoRAs loaded through diffusers' public loader."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel

from stages.lib.models.lora_formats import check_same_keys, max_abs_diff

COMPONENTS = ("unet", "vae", "text_encoder")
PROBE_LATENT = 32  # latent side of the probe (SD1.5: 256 px), small enough for a CPU


@torch.no_grad()
def unet_probe(unet: UNet2DConditionModel, seed: int = 0) -> torch.Tensor:
    """One UNet forward on fixed noise, timestep and text context: compares weights by what they compute."""
    cfg, gen = unet.config, torch.Generator().manual_seed(seed)
    side = min(cfg.sample_size, PROBE_LATENT)
    sample = torch.randn(1, cfg.in_channels, side, side, generator=gen)
    context = torch.randn(1, 77, cfg.cross_attention_dim, generator=gen)
    to = {"device": unet.device, "dtype": unet.dtype}
    timestep = torch.tensor([500], device=unet.device)
    return unet(sample.to(**to), timestep, context.to(**to)).sample.float().cpu()


@torch.no_grad()
def text_encoder_changed(base: torch.nn.Module, tuned: torch.nn.Module) -> bool:
    """Whether any text-encoder tensor differs (DreamBooth with ``train_text_encoder``)."""
    tuned_state = tuned.state_dict()
    return any(not torch.equal(v.cpu(), tuned_state[k].cpu()) for k, v in base.state_dict().items())


def output_diff(unet: UNet2DConditionModel, reference: torch.Tensor) -> float:
    """Largest absolute difference of ``unet``'s probe output from ``reference``."""
    return (unet_probe(unet) - reference).abs().max().item()


def moved_towards(before: torch.Tensor, after: torch.Tensor, target: torch.Tensor) -> float:
    """|after - target| / |before - target|: below 1 when ``after`` is closer to ``target``."""
    return ((after - target).norm() / (before - target).norm().clamp_min(1e-12)).item()


def weights_diff(
    source: StableDiffusionPipeline, loaded: StableDiffusionPipeline, dtype: torch.dtype, where: Path
) -> float:
    """Largest difference of unet / vae / text encoder tensors, the source rounded to the file's ``dtype``
    (tensor by tensor: no second copy of a full-size model in memory)."""
    worst = 0.0
    for name in COMPONENTS:
        expected, got = getattr(source, name).state_dict(), getattr(loaded, name).state_dict()
        check_same_keys(expected, got, where)
        for key, tensor in expected.items():
            rounded = tensor.to(dtype).to(got[key].dtype) if tensor.is_floating_point() else tensor
            worst = max(worst, max_abs_diff({key: rounded}, {key: got[key]}, where))
    return worst


@contextmanager
def lora_loaded(pipe: StableDiffusionPipeline, source: Path, **kwargs: str) -> Iterator[None]:
    """The pipeline with one LoRA loaded by ``pipe.load_lora_weights``; unloaded again afterwards."""
    pipe.load_lora_weights(str(source), **kwargs)
    try:
        yield
    finally:
        pipe.unload_lora_weights()


def megabytes(path: Path) -> float:
    return path.stat().st_size / 2**20
