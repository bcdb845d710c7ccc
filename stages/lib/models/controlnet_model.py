"""ControlNet, written once: a new ControlNet from a UNet, the real-weights loader (diffusers folder,
single file, hub cache; never the network), the denoiser the shared training loop trains, the pipeline, and the
diffusers -> original (single-file) key conversion.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch
from diffusers import ControlNetModel, StableDiffusionControlNetPipeline, StableDiffusionPipeline
from safetensors import SafetensorError, safe_open
from torch import Tensor

from stages.lib.models.loading import SD15_CONFIG_DIR, ModelLoadError
from stages.lib.models.pickles import load_weights_only
from stages.lib.models.single_file import (
    Rule,
    convert_state_dict,
    diffusers_reads_ckpt_weights_only,
    unet_rules,
)
from stages.lib.runtime.seeding import seeded

CONTROLNET_CONFIG_DIR = SD15_CONFIG_DIR / "controlnet"  # lllyasviel/sd-controlnet-canny's config.json
SINGLE_FILE_SUFFIXES = (".safetensors", ".pth", ".ckpt")
ORIGINAL_PREFIX = "control_model."
COND_EMBEDDING_CHANNELS = (16, 32, 96, 256)  # diffusers' default; one stride-2 conv between entries


class ControlNetLoadError(ModelLoadError):
    """A configured ControlNet cannot be loaded or does not fit the base model; names the path and the fix."""


# ------------------------------------------------------------------------------------------------ models


def new_controlnet(pipe: StableDiffusionPipeline, seed: int = 0) -> ControlNetModel:
    """A ControlNet initialised from ``pipe.unet`` (diffusers' ``from_unet``), its conditioning embedding sized to
    downsample pixels to latents as the pipeline's VAE does (x8 for SD1.5).

    The conditioning embedding's first convolutions are randomly initialised: from ``seed``, so that the same
    config trains the same ControlNet (the global random state is left as it was).
    """
    scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    n = int(math.log2(scale)) + 1
    if n > len(COND_EMBEDDING_CHANNELS):
        raise ControlNetLoadError(f"VAE downsamples x{scale}: no ControlNet conditioning embedding for that")
    with seeded(seed):
        return ControlNetModel.from_unet(
            pipe.unet, conditioning_embedding_out_channels=COND_EMBEDDING_CHANNELS[:n]
        )


class ControlledUNet(torch.nn.Module):
    """The denoiser of ControlNet training: the ControlNet's residuals added into a frozen UNet.

    Called like a UNet plus ``controlnet_cond`` (see ``stages.lib.training.trainer.denoise``).
    """

    def __init__(self, controlnet: ControlNetModel, unet: torch.nn.Module) -> None:
        super().__init__()
        self.controlnet, self.unet = controlnet, unet

    def forward(
        self, sample: Tensor, timestep: Tensor, encoder_hidden_states: Tensor, controlnet_cond: Tensor
    ):
        down, mid = self.controlnet(
            sample, timestep, encoder_hidden_states, controlnet_cond=controlnet_cond, return_dict=False
        )
        return self.unet(
            sample,
            timestep,
            encoder_hidden_states,
            down_block_additional_residuals=down,
            mid_block_additional_residual=mid,
        )


def _single_file_keys(path: Path) -> list[str]:
    if path.suffix != ".safetensors":
        if not diffusers_reads_ckpt_weights_only():
            raise ControlNetLoadError(
                f"{path}: this diffusers version unpickles {path.suffix} files without weights_only=True; "
                "refusing to load a pickle. Use a .safetensors file."
            )
        try:
            checkpoint = load_weights_only(path)
        except ModelLoadError as err:
            raise ControlNetLoadError(f"controlnet.model_path={err}") from err
        while isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict):
            checkpoint = checkpoint["state_dict"]
        return list(checkpoint) if isinstance(checkpoint, dict) else []
    try:
        with safe_open(str(path), framework="pt") as handle:
            return list(handle.keys())
    except (SafetensorError, OSError) as err:
        raise ControlNetLoadError(f"{path}: not a readable .safetensors file ({err})") from err


def load_controlnet(path: str, revision: str = "", torch_dtype: torch.dtype | None = None) -> ControlNetModel:
    """A pretrained ControlNet from a diffusers folder, a single file (original layout, read with the shipped SD1.5
    ControlNet config) or a hub id at a pinned ``revision`` in the local cache -- never from the network."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    local = Path(path).expanduser()
    key = "controlnet.model_path"
    try:
        if local.is_dir():
            if not (local / "config.json").is_file():
                raise ControlNetLoadError(
                    f"{key}={path}: folder without config.json (not a diffusers ControlNet)"
                )
            return ControlNetModel.from_pretrained(local, torch_dtype=torch_dtype, local_files_only=True)
        if local.is_file():
            if local.suffix not in SINGLE_FILE_SUFFIXES:
                raise ControlNetLoadError(
                    f"{key}={path}: unsupported suffix '{local.suffix}'; use {', '.join(SINGLE_FILE_SUFFIXES)}"
                )
            keys = _single_file_keys(local)
            if not any(
                k.startswith(ORIGINAL_PREFIX) or k.startswith("controlnet_cond_embedding") for k in keys
            ):
                raise ControlNetLoadError(
                    f"{key}={path}: no ControlNet weights (no '{ORIGINAL_PREFIX}*' keys); is it a full SD checkpoint?"
                )
            return ControlNetModel.from_single_file(
                str(local), config=str(CONTROLNET_CONFIG_DIR), local_files_only=True, torch_dtype=torch_dtype
            )
        if path.count("/") != 1 or path.startswith((".", "/", "~")):
            raise ControlNetLoadError(f"{key}={path}: no such file or folder (and not a hub id 'owner/name')")
        if not revision:
            raise ControlNetLoadError(f"{key}={path} is a hub id: pin it with controlnet.revision=<commit>")
        return ControlNetModel.from_pretrained(
            path, revision=revision, torch_dtype=torch_dtype, local_files_only=True
        )
    except ControlNetLoadError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        hint = (
            f" Download it where there is network: huggingface-cli download {path} --revision {revision}"
            if not local.exists()
            else ""
        )
        raise ControlNetLoadError(
            f"{key}={path}: cannot be loaded as an SD1.x ControlNet ({err}).{hint}"
        ) from err


def check_compatible(controlnet: ControlNetModel, unet: torch.nn.Module, where: str) -> None:
    """The ControlNet must share the UNet's encoder shape (an SD2/SDXL ControlNet does not fit SD1.5)."""
    keys = ("in_channels", "cross_attention_dim", "block_out_channels", "layers_per_block")
    diff = {
        k: (controlnet.config[k], unet.config[k]) for k in keys if list_or(controlnet, k) != list_or(unet, k)
    }
    if diff:
        detail = ", ".join(f"{k}: {a} vs UNet {b}" for k, (a, b) in diff.items())
        raise ControlNetLoadError(f"{where}: ControlNet does not fit the base model's UNet ({detail})")


def list_or(model: Any, key: str) -> Any:
    value = model.config[key]
    return list(value) if isinstance(value, tuple | list) else value


def control_pipeline(
    pipe: StableDiffusionPipeline, controlnet: ControlNetModel
) -> StableDiffusionControlNetPipeline:
    """diffusers' ControlNet pipeline over ``pipe``'s components (shared modules: a LoRA loaded later shows in both)."""
    parts = {k: v for k, v in pipe.components.items() if k != "image_encoder"}
    return StableDiffusionControlNetPipeline(**parts, controlnet=controlnet, requires_safety_checker=False)


# ------------------------------------------------------------------------------- diffusers -> original


def original_rules(config: dict[str, Any]) -> list[Rule]:
    """Rename table of a ControlNetModel to the original (lllyasviel) layout under ``control_model.``."""
    n_blocks = len(config["down_block_types"])
    layers = config["layers_per_block"]
    n_inputs = 1 + n_blocks * layers + (n_blocks - 1)  # conv_in, the layers, the downsamplers
    n_hint = len(config["conditioning_embedding_out_channels"])
    unet_like = {**config, "up_block_types": ["UpBlock2D"] * n_blocks}  # the UNet's encoder half is shared
    shared = ("conv_in", "time_embedding", "down_blocks", "mid_block")
    rules = [r for r in unet_rules(unet_like) if r.ours.startswith(shared)]
    rules += [Rule(f"controlnet_down_blocks.{i}", f"zero_convs.{i}.0") for i in range(n_inputs)]
    rules.append(Rule("controlnet_mid_block", "middle_block_out.0"))
    rules.append(Rule("controlnet_cond_embedding.conv_in", "input_hint_block.0"))
    rules += [
        Rule(f"controlnet_cond_embedding.blocks.{i}", f"input_hint_block.{2 * (i + 1)}")
        for i in range(2 * (n_hint - 1))
    ]
    rules.append(Rule("controlnet_cond_embedding.conv_out", f"input_hint_block.{2 * (2 * (n_hint - 1) + 1)}"))
    return rules


def controlnet_to_original(controlnet: ControlNetModel) -> dict[str, Tensor]:
    """The state dict of ``controlnet`` in the original single-file layout (what A1111/ComfyUI load)."""
    return convert_state_dict(
        controlnet.state_dict(), original_rules(dict(controlnet.config)), ORIGINAL_PREFIX
    )
