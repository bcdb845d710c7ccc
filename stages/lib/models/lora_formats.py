"""LoRA file formats: diffusers <-> kohya (AUTOMATIC1111 / ComfyUI), training metadata, the seed's .bin copy.

kohya sd-scripts trains SD1.x on the diffusers UNet and names each adapter ``lora_unet_`` + the diffusers
module path with dots replaced by underscores
(``lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q``), with ``.lora_down.weight`` /
``.lora_up.weight`` / ``.alpha`` per module. A1111, ComfyUI and diffusers' ``load_lora_weights`` all read
that naming.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save, save_file
from torch import Tensor

from stages.lib.config.schema import DataConfig, TrainConfig
from stages.lib.errors import StageError

BIN_WEIGHT = "pytorch_lora_weights.bin"
UNET_KEY_PREFIX = "unet."
KOHYA_PREFIX = "lora_unet_"
# diffusers (and PEFT) tensor suffixes -> kohya tensor suffixes
KOHYA_PARTS = {
    ".lora.down.weight": "lora_down.weight",
    ".lora.up.weight": "lora_up.weight",
    ".lora_A.weight": "lora_down.weight",
    ".lora_B.weight": "lora_up.weight",
}


class LoraFormatError(StageError):
    """A LoRA file cannot be converted or does not survive a round trip; the message names the key or file."""


# ------------------------------------------------------------------------------------------------ key formats


def kohya_module_name(module: str) -> str:
    """``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0`` -> ``lora_unet_down_..._out_0``."""
    return KOHYA_PREFIX + module.replace(".", "_")


def split_diffusers_key(key: str) -> tuple[str, str]:
    """(UNet module path, kohya tensor suffix) of one diffusers LoRA key."""
    if not key.startswith(UNET_KEY_PREFIX):
        raise LoraFormatError(f"LoRA key '{key}': only UNet adapters (keys under 'unet.') can be exported")
    for suffix, part in KOHYA_PARTS.items():
        if key.endswith(suffix):
            return key[len(UNET_KEY_PREFIX) : -len(suffix)], part
    raise LoraFormatError(f"LoRA key '{key}': expected one of {', '.join(KOHYA_PARTS)} at the end")


def diffusers_to_kohya(state_dict: Mapping[str, Tensor], alpha: float) -> dict[str, Tensor]:
    """kohya tensors of a diffusers UNet LoRA; every module gets ``alpha`` (scale = alpha / rank)."""
    out: dict[str, Tensor] = {}
    for key, tensor in state_dict.items():
        module, part = split_diffusers_key(key)
        name = kohya_module_name(module)
        out[f"{name}.{part}"] = tensor.contiguous()
        out[f"{name}.alpha"] = torch.tensor(float(alpha), dtype=tensor.dtype)
    return out


def kohya_to_diffusers(state_dict: Mapping[str, Tensor], modules: Iterable[str]) -> dict[str, Tensor]:
    """The inverse, given the UNet module paths (kohya's underscores alone are ambiguous); alphas dropped."""
    table = {kohya_module_name(module): module for module in modules}
    out: dict[str, Tensor] = {}
    for key, tensor in state_dict.items():
        name, _, part = key.partition(".")
        if part == "alpha":
            continue
        if name not in table or part not in ("lora_down.weight", "lora_up.weight"):
            raise LoraFormatError(f"kohya key '{key}' names no known UNet module")
        out[f"{UNET_KEY_PREFIX}{table[name]}.lora.{part.split('_')[1]}"] = tensor
    return out


def trained_alpha(path: Path, default: float) -> float:
    """The adapter's alpha from diffusers' ``lora_adapter_metadata`` header when saved, else ``default``."""
    with safe_open(str(path), framework="pt") as handle:
        raw = (handle.metadata() or {}).get("lora_adapter_metadata")
    return float(json.loads(raw).get("unet.lora_alpha", default)) if raw else float(default)


# --------------------------------------------------------------------------------------------------- metadata


def kohya_metadata(
    output_name: str, rank: int, alpha: float, train: TrainConfig, steps: int, base: Mapping[str, str]
) -> dict[str, str]:
    """The ``ss_*`` / ``modelspec.*`` keys that A1111, ComfyUI and civitai read from kohya LoRAs.

    ``base`` holds the base model's ``name`` and ``sha256``; project keys are added by the caller.
    """
    values = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": rank,
        "ss_network_alpha": f"{alpha:g}",
        "ss_output_name": output_name,
        "ss_base_model_version": "sd_v1",
        "ss_v2": False,
        "ss_sd_model_name": base["name"],
        "ss_new_sd_model_hash": base["sha256"],
        "ss_learning_rate": train.learning_rate,
        "ss_unet_lr": train.learning_rate,
        "ss_lr_scheduler": train.lr_scheduler,
        "ss_lr_warmup_steps": train.lr_warmup_steps,
        "ss_optimizer": train.optimizer,
        "ss_max_train_steps": train.max_train_steps,
        "ss_steps": steps,
        "ss_seed": train.seed,
        "ss_batch_size_per_device": train.train_batch_size,
        "ss_resolution": f"({train.resolution}, {train.resolution})",
        "ss_mixed_precision": train.mixed_precision,
        "ss_prior_loss_weight": train.prior_loss_weight if train.with_prior_preservation else 0.0,
        "ss_min_snr_gamma": train.snr_gamma,
        "ss_noise_offset": train.noise_offset,
        "ss_max_grad_norm": train.max_grad_norm,
        "ss_gradient_checkpointing": train.gradient_checkpointing,
        "ss_network_train_unet_only": True,
    }
    spec = modelspec("stable-diffusion-v1/lora", "diffusers", output_name, train.resolution)
    return {**{key: str(value) for key, value in values.items()}, **spec}


def modelspec(architecture: str, implementation: str, title: str, resolution: int) -> dict[str, str]:
    """Stability AI's model-spec keys (what sd-scripts writes beside ``ss_*``)."""
    return {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": architecture,
        "modelspec.implementation": implementation,
        "modelspec.title": title,
        "modelspec.resolution": f"{resolution}x{resolution}",
    }


def project_metadata(data: DataConfig, base: Mapping[str, str], commit: str) -> dict[str, str]:
    """The project's keys in every exported header: prompts, base model (name, sha256, revision), commit."""
    return {
        "sdp_instance_prompt": data.instance_prompt,
        "sdp_class_prompt": data.class_prompt,
        "sdp_base_model": base["name"],
        "sdp_base_model_sha256": base["sha256"],
        "sdp_base_model_revision": base.get("revision", ""),
        "sdp_git_commit": commit,
    }


def addnet_hashes(tensors: Mapping[str, Tensor], metadata: Mapping[str, str]) -> dict[str, str]:
    """``sshs_model_hash`` / ``sshs_legacy_hash`` as kohya computes them (A1111 shows the LoRA's hash).

    The model hash covers the tensor data only; the legacy one a fixed slice of the file with the ``ss_*``
    header.
    """
    blob = save(dict(tensors), metadata={k: v for k, v in metadata.items() if k.startswith("ss_")})
    header = int.from_bytes(blob[:8], "little")
    return {
        "sshs_model_hash": hashlib.sha256(blob[8 + header :]).hexdigest(),
        "sshs_legacy_hash": hashlib.sha256(blob[0x100000:0x110000]).hexdigest()[:8],
    }


def check_metadata(metadata: Mapping[str, object], path: Path) -> dict[str, str]:
    """safetensors headers hold str -> str only."""
    bad = {k: v for k, v in metadata.items() if not isinstance(v, str)}
    if bad:
        raise LoraFormatError(f"{path}: metadata values must be str, got {bad!r}")
    return dict(metadata)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------- writers


def save_kohya(
    state_dict: Mapping[str, Tensor], alpha: float, path: Path, metadata: Mapping[str, str]
) -> float:
    """Write a diffusers UNet LoRA as a kohya ``.safetensors`` with ``metadata`` and kohya's hashes;
    reload it, convert it back and return the largest tensor difference (0: exact; anything else raises)."""
    tensors = diffusers_to_kohya(state_dict, alpha)
    header = check_metadata(metadata, path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"format": "pt", **header, **addnet_hashes(tensors, header)})
    modules = {split_diffusers_key(key)[0] for key in state_dict}
    return exact_round_trip(state_dict, kohya_to_diffusers(load_file(path), modules), path)


def save_bin(state_dict: Mapping[str, Tensor], path: Path) -> float:
    """``torch.save`` the state dict, reload it with ``weights_only=True`` and require every tensor exact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(dict(state_dict), path)
    return exact_round_trip(state_dict, torch.load(path, map_location="cpu", weights_only=True), path)


# ------------------------------------------------------------------------------------------ exact round trips


def exact_round_trip(expected: Mapping[str, Tensor], got: Mapping[str, Tensor], path: Path) -> float:
    """0.0 when ``got`` (reloaded from ``path``) equals ``expected`` tensor for tensor; else an error."""
    diff = max_abs_diff(expected, got, path)
    if diff != 0.0:
        raise LoraFormatError(f"{path}: tensors changed in the round trip (max abs diff {diff})")
    return diff


def max_abs_diff(expected: Mapping[str, Tensor], got: Mapping[str, Tensor], where: Path) -> float:
    """Largest absolute difference of two state dicts; differing keys, shapes or dtypes are an error."""
    check_same_keys(expected, got, where)
    worst = 0.0
    for key, tensor in expected.items():
        other = got[key]
        if other.shape != tensor.shape or other.dtype != tensor.dtype:
            raise LoraFormatError(
                f"{where}: '{key}' is {other.dtype}{tuple(other.shape)}, "
                f"expected {tensor.dtype}{tuple(tensor.shape)}"
            )
        if not torch.equal(other, tensor):  # NaN anywhere counts as an infinite difference
            diff = (other.double() - tensor.double()).abs().max().item()
            worst = max(worst, float("inf") if math.isnan(diff) else diff)
    return worst


def check_same_keys(expected: Mapping[str, object], got: Mapping[str, object], where: Path) -> None:
    """Both state dicts name the same tensors; else an error listing a few of the differences."""
    if expected.keys() != got.keys():
        missing, extra = sorted(expected.keys() - got.keys()), sorted(got.keys() - expected.keys())
        raise LoraFormatError(f"{where}: keys differ (missing {missing[:3]}, extra {extra[:3]})")
