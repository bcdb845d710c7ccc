"""Model-agnostic subject metrics that need no downloaded weights."""

from __future__ import annotations

import torch
from diffusers import StableDiffusionPipeline


@torch.no_grad()
def sample_latents(
    pipe: StableDiffusionPipeline, prompt: str, num: int, steps: int, seed: int, resolution: int
) -> torch.Tensor:
    """Seeded samples of ``prompt`` as unscaled VAE latents (N, C, h, w)."""
    pipe.set_progress_bar_config(disable=True)
    latents = pipe(
        prompt,
        num_images_per_prompt=num,
        num_inference_steps=steps,
        height=resolution,
        width=resolution,
        output_type="latent",
        generator=torch.Generator().manual_seed(seed),
    ).images
    return latents.float().cpu() / pipe.vae.config.scaling_factor


def nearest_subject_distance(samples: torch.Tensor, subject: torch.Tensor) -> float:
    """Mean over samples of the RMS distance to the closest subject latent: lower is closer to the subject."""
    flat_s = samples.flatten(1)
    flat_t = subject.flatten(1).to(flat_s)
    dists = torch.cdist(flat_s, flat_t) / flat_s.shape[1] ** 0.5
    return float(dists.min(dim=1).values.mean())
