"""The denoising objective: targets, min-SNR weights, offset noise, face-weighted instance loss."""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr


def sample_noise(shape: tuple[int, ...], generator: torch.Generator, offset: float) -> torch.Tensor:
    """Gaussian noise, plus per-channel offset noise (``offset`` * N(0,1) broadcast over the image) if > 0."""
    noise = torch.randn(shape, generator=generator)
    if offset > 0:
        noise = noise + offset * torch.randn(shape[0], shape[1], 1, 1, generator=generator)
    return noise


def diffusion_target(
    scheduler: DDPMScheduler, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor
) -> torch.Tensor:
    """epsilon or v, per the scheduler's prediction type."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, t)
    raise ValueError(f"unsupported prediction_type '{kind}' (epsilon or v_prediction)")


def min_snr_weights(scheduler: DDPMScheduler, t: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023); ones when gamma is 0."""
    if gamma <= 0:
        return torch.ones(t.shape[0], device=t.device)
    snr = compute_snr(scheduler, t)
    weights = torch.clamp(snr, max=gamma) / snr
    if scheduler.config.prediction_type == "v_prediction":
        weights = torch.clamp(snr, max=gamma) / (snr + 1)
    return weights


def per_sample_mse(
    pred: torch.Tensor, target: torch.Tensor, weight_map: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean squared error per sample (B,), optionally weighted by a (B, 1, h, w) map of mean 1."""
    err = (pred.float() - target.float()) ** 2
    if weight_map is not None:
        err = err * weight_map
    return err.mean(dim=tuple(range(1, err.ndim)))
