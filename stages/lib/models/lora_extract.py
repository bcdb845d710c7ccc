"""A LoRA extracted from a fully fine-tuned UNet: truncated SVD of each target projection's weight delta.

Only the Linear weights of the LoRA target modules (the attention projections the trained LoRAs use) are
approximated; biases, convolutions and norms that DreamBooth also changed are not representable: left out.
The file is diffusers' LoRA format with alpha = rank (scale 1), so ``pipe.load_lora_weights(folder)`` applies
``W_base + up @ down`` ~ ``W_dreambooth``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from torch import Tensor, nn

from stages.lib.errors import StageError
from stages.lib.layout import LORA_WEIGHT_NAME


@dataclass
class Extraction:
    """LoRA tensors (diffusers keys without the ``unet.`` prefix) and how well they approximate the delta."""

    rank: int
    layers: dict[str, Tensor] = field(default_factory=dict)
    errors: dict[str, float] = field(default_factory=dict)  # per module: |delta - up @ down|_F / |delta|_F
    delta_sq: float = 0.0
    residual_sq: float = 0.0

    @property
    def relative_error(self) -> float:
        """Relative Frobenius error over all modules together."""
        return math.sqrt(self.residual_sq / self.delta_sq) if self.delta_sq > 0 else 0.0


def target_linears(unet: UNet2DConditionModel, targets: Sequence[str]) -> dict[str, nn.Linear]:
    """The UNet's Linear layers whose module path ends with one of ``targets`` (e.g. ``to_out.0``)."""
    suffixes = tuple(f".{target}" for target in targets)
    return {
        name: module
        for name, module in unet.named_modules()
        if isinstance(module, nn.Linear) and name.endswith(suffixes)
    }


def low_rank_factors(delta: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """``up`` (out x rank) and ``down`` (rank x in) whose product is the best rank-``rank`` approximation.

    The singular values are split evenly (sqrt into each factor); past the matrix's full rank the factors are
    zero-padded, so every module of the file has the same rank (and diffusers the same scale for each).
    """
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    k = min(rank, s.numel())
    root = s[:k].sqrt()
    up = delta.new_zeros(delta.shape[0], rank)
    down = delta.new_zeros(rank, delta.shape[1])
    up[:, :k] = u[:, :k] * root
    down[:k] = root[:, None] * vh[:k]
    return up.contiguous(), down.contiguous()


@torch.no_grad()
def extract_lora(
    base: UNet2DConditionModel,
    tuned: UNet2DConditionModel,
    targets: Sequence[str],
    rank: int,
    device: torch.device | str = "cpu",
) -> Extraction:
    """Rank-``rank`` LoRA of ``tuned - base`` on the ``targets`` projections (CPU tensors).

    ``device``: where the SVDs run. SD1.5's 128 projections take minutes on a few CPU cores and about a second on
    a GPU; the factors differ by float rounding only.
    """
    if rank < 1:
        raise StageError(f"convert.extract_rank={rank}: must be >= 1 (0 disables the extraction)")
    before, after = target_linears(base, targets), target_linears(tuned, targets)
    if not before or before.keys() != after.keys():
        raise StageError(
            f"base and DreamBooth UNets do not share the LoRA target modules {list(targets)} "
            f"({len(before)} vs {len(after)} found): were they trained from the same base model?"
        )
    result = Extraction(rank)
    for name, module in before.items():
        delta = after[name].weight.to(device, torch.float32) - module.weight.to(device, torch.float32)
        up, down = low_rank_factors(delta, rank)
        residual = (delta - up @ down).square().sum().item()
        total = delta.square().sum().item()
        result.layers[f"{name}.lora.down.weight"] = down.cpu()
        result.layers[f"{name}.lora.up.weight"] = up.cpu()
        result.errors[name] = math.sqrt(residual / total) if total > 0 else 0.0
        result.delta_sq += total
        result.residual_sq += residual
    return result


def save_extracted(extraction: Extraction, folder: Path) -> Path:
    """Write the extraction in diffusers' LoRA format: ``folder/pytorch_lora_weights.safetensors``."""
    StableDiffusionPipeline.save_lora_weights(
        folder, unet_lora_layers=extraction.layers, weight_name=LORA_WEIGHT_NAME
    )
    return folder / LORA_WEIGHT_NAME
