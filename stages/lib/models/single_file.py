"""SD1.x single-file checkpoints (civitai-style ``.safetensors`` / ``.ckpt``): load offline, and write them back.

Loading uses diffusers' own original->diffusers conversion with the SD1.5 configs shipped in ``sd15_configs/``.
Writing needs the reverse conversion, which the diffusers wheel lacks: a rename table built from each model's
config (number of blocks, layers per block), so tiny SD-shaped models convert as well as full-size ones.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterable, Mapping
from fractions import Fraction
from functools import lru_cache
from pathlib import Path
from types import MappingProxyType
from typing import Any, NamedTuple

import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.loaders import single_file_utils
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor
from transformers import CLIPTextModel

from stages.lib.models.loading import PIPELINE_KWARGS, SD15_CONFIG_DIR, ModelLoadError, check_tokenizer
from stages.lib.models.tokenizer import write_tokenizer_files

SUFFIXES = (".safetensors", ".ckpt")
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer.text_model."
REQUIRED_PREFIXES = {"UNet": UNET_PREFIX, "VAE": VAE_PREFIX, "CLIP text encoder": TEXT_PREFIX}
NO_LEAVES: Mapping[str, str] = MappingProxyType({})
PEFT_MARKERS = (".lora_", ".base_layer.")  # un-merged adapters have no place in a single file

# (diffusers name, original name) of sub-modules inside a renamed module.
UNET_RESNET = MappingProxyType(
    {
        "norm1": "in_layers.0",
        "conv1": "in_layers.2",
        "norm2": "out_layers.0",
        "conv2": "out_layers.3",
        "time_emb_proj": "emb_layers.1",
        "conv_shortcut": "skip_connection",
    }
)
VAE_RESNET = MappingProxyType({"conv_shortcut": "nin_shortcut"})
VAE_ATTENTION = MappingProxyType(
    {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
)
UNET_FIXED = (
    ("conv_in", "input_blocks.0.0"),
    ("time_embedding.linear_1", "time_embed.0"),
    ("time_embedding.linear_2", "time_embed.2"),
    ("conv_norm_out", "out.0"),
    ("conv_out", "out.2"),
)
VAE_FIXED = (
    ("encoder.conv_in", "encoder.conv_in"),
    ("encoder.conv_out", "encoder.conv_out"),
    ("encoder.conv_norm_out", "encoder.norm_out"),
    ("decoder.conv_in", "decoder.conv_in"),
    ("decoder.conv_out", "decoder.conv_out"),
    ("decoder.conv_norm_out", "decoder.norm_out"),
    ("quant_conv", "quant_conv"),
    ("post_quant_conv", "post_quant_conv"),
)
TEXT_FIXED = (("embeddings", "embeddings"), ("encoder", "encoder"), ("final_layer_norm", "final_layer_norm"))


class SingleFileError(ModelLoadError):
    """A single-file checkpoint cannot be read or written; the message names the file and the fix."""


class Rule(NamedTuple):
    """Rename the diffusers module ``ours`` to the original module ``theirs``."""

    ours: str
    theirs: str
    leaves: Mapping[str, str] = NO_LEAVES
    linear_as_conv: bool = False  # original stores these Linear weights as 1x1 convolutions


# ---------------------------------------------------------------------------------------------- rule tables


def _per_block(value: int | Iterable[int], n: int) -> list[int]:
    """``layers_per_block`` may be one int or one per block."""
    return [int(value)] * n if isinstance(value, int) else [int(v) for v in value]


def _layer_rules(block: str, layer: int, theirs: str) -> list[Rule]:
    """One UNet layer: a resnet at ``.0`` and (in cross-attention blocks) a transformer at ``.1``."""
    return [
        Rule(f"{block}.resnets.{layer}", f"{theirs}.0", UNET_RESNET),
        Rule(f"{block}.attentions.{layer}", f"{theirs}.1"),
    ]


def unet_rules(config: Mapping[str, Any]) -> list[Rule]:
    """Rename table of a UNet2DConditionModel laid out like SD1.x (any depth, any layers per block)."""
    n = len(config["down_block_types"])
    layers = _per_block(config["layers_per_block"], n)
    rules = [Rule(ours, theirs) for ours, theirs in UNET_FIXED]
    index = 1  # input_blocks.0 is conv_in
    for i in range(n):
        for j in range(layers[i]):
            rules += _layer_rules(f"down_blocks.{i}", j, f"input_blocks.{index}")
            index += 1
        if i < n - 1:
            rules.append(Rule(f"down_blocks.{i}.downsamplers.0.conv", f"input_blocks.{index}.0.op"))
            index += 1
    rules += [
        Rule("mid_block.resnets.0", "middle_block.0", UNET_RESNET),
        Rule("mid_block.attentions.0", "middle_block.1"),
        Rule("mid_block.resnets.1", "middle_block.2", UNET_RESNET),
    ]
    index = 0
    for i, (block_type, n_layers) in enumerate(zip(config["up_block_types"], reversed(layers), strict=True)):
        for j in range(n_layers + 1):
            rules += _layer_rules(f"up_blocks.{i}", j, f"output_blocks.{index}")
            index += 1
        if i < n - 1:  # the upsampler follows the last layer's resnet (and transformer, if any)
            slot = 2 if "Attn" in block_type else 1
            rules.append(Rule(f"up_blocks.{i}.upsamplers.0", f"output_blocks.{index - 1}.{slot}"))
    return rules


def vae_rules(config: Mapping[str, Any]) -> list[Rule]:
    """Rename table of an AutoencoderKL; the original numbers decoder blocks from the bottom up."""
    n = len(config["down_block_types"])
    layers = int(config["layers_per_block"])
    rules = [Rule(ours, theirs) for ours, theirs in VAE_FIXED]
    for i in range(n):
        up = n - 1 - i
        rules += [
            Rule(f"encoder.down_blocks.{i}.resnets.{j}", f"encoder.down.{i}.block.{j}", VAE_RESNET)
            for j in range(layers)
        ]
        rules += [
            Rule(f"decoder.up_blocks.{i}.resnets.{j}", f"decoder.up.{up}.block.{j}", VAE_RESNET)
            for j in range(layers + 1)
        ]
        if i < n - 1:
            rules.append(Rule(f"encoder.down_blocks.{i}.downsamplers.0", f"encoder.down.{i}.downsample"))
            rules.append(Rule(f"decoder.up_blocks.{i}.upsamplers.0", f"decoder.up.{up}.upsample"))
    for part in ("encoder", "decoder"):
        rules += [
            Rule(f"{part}.mid_block.resnets.{k}", f"{part}.mid.block_{k + 1}", VAE_RESNET) for k in (0, 1)
        ]
        rules.append(
            Rule(f"{part}.mid_block.attentions.0", f"{part}.mid.attn_1", VAE_ATTENTION, linear_as_conv=True)
        )
    return rules


# ------------------------------------------------------------------------------------ diffusers -> original


def _find_rule(key: str, table: Mapping[str, Rule]) -> tuple[Rule, str]:
    """The rule of the longest module prefix of ``key``, and the rest of the key."""
    parts = key.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        rule = table.get(".".join(parts[:cut]))
        if rule is not None:
            return rule, ".".join(parts[cut:])
    raise SingleFileError(f"no SD1.x single-file name for parameter '{key}': the model is not SD1.x-shaped")


def _rename_leaf(rest: str, leaves: Mapping[str, str]) -> str:
    for ours, theirs in leaves.items():
        if rest.startswith(ours + "."):
            return theirs + rest[len(ours) :]
    return rest


def convert_state_dict(
    state_dict: Mapping[str, Tensor], rules: Iterable[Rule], prefix: str
) -> dict[str, Tensor]:
    """Rename every tensor by ``rules`` and put ``prefix`` in front; an unmatched name is an error."""
    table = {rule.ours: rule for rule in rules}
    out: dict[str, Tensor] = {}
    for key, tensor in state_dict.items():
        if any(marker in key for marker in PEFT_MARKERS):
            raise SingleFileError(
                f"parameter '{key}' belongs to an un-merged LoRA adapter: merge it first "
                "(pipe.fuse_lora() then pipe.unload_lora_weights(), or peft's merge_and_unload())"
            )
        rule, rest = _find_rule(key, table)
        if rule.linear_as_conv and rest.endswith("weight") and tensor.ndim == 2:
            tensor = tensor.reshape(*tensor.shape, 1, 1)
        name = f"{prefix}{rule.theirs}.{_rename_leaf(rest, rule.leaves)}"
        if name in out:
            raise SingleFileError(f"two parameters map to '{name}' (second: '{key}'): rename table is wrong")
        out[name] = tensor
    return out


def text_encoder_state_dict(text_encoder: CLIPTextModel) -> dict[str, Tensor]:
    """CLIP weights under ``cond_stage_model.transformer.text_model.`` plus the original's position_ids.

    transformers >= 5.6 flattened CLIPTextModel (keys without ``text_model.``); older versions nest it.
    """
    flat = {key.removeprefix("text_model."): value for key, value in text_encoder.state_dict().items()}
    out = convert_state_dict(flat, [Rule(ours, theirs) for ours, theirs in TEXT_FIXED], TEXT_PREFIX)
    positions = text_encoder.config.max_position_embeddings
    out.setdefault(f"{TEXT_PREFIX}embeddings.position_ids", torch.arange(positions, dtype=torch.int64)[None])
    return out


def pipeline_to_original_state_dict(
    unet: UNet2DConditionModel, vae: AutoencoderKL, text_encoder: CLIPTextModel
) -> dict[str, Tensor]:
    """The state dict of an SD1.x single file (original CompVis/LDM names) for diffusers components."""
    return {
        **convert_state_dict(unet.state_dict(), unet_rules(unet.config), UNET_PREFIX),
        **convert_state_dict(vae.state_dict(), vae_rules(vae.config), VAE_PREFIX),
        **text_encoder_state_dict(text_encoder),
    }


def _components(pipe_or_components: Any) -> tuple[UNet2DConditionModel, AutoencoderKL, CLIPTextModel]:
    """unet, vae, text_encoder of a pipeline or of a mapping such as ``pipe.components``."""
    source = pipe_or_components
    get = source.get if isinstance(source, Mapping) else lambda name: getattr(source, name, None)
    parts = tuple(get(name) for name in ("unet", "vae", "text_encoder"))
    if any(part is None for part in parts):
        raise SingleFileError(
            "save_single_file needs a pipeline or a mapping with unet, vae and text_encoder"
        )
    return parts  # type: ignore[return-value]


def _tensor_for_file(tensor: Tensor, dtype: torch.dtype | None) -> Tensor:
    tensor = tensor.detach().to("cpu")
    if dtype is not None and tensor.is_floating_point():
        tensor = tensor.to(dtype)
    return tensor.contiguous()


def save_single_file(
    pipe_or_components: Any,
    path: str | Path,
    metadata: Mapping[str, str] | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write unet + vae + text encoder as one SD1.x ``.safetensors`` (e.g. ``dtype=torch.float16``)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise SingleFileError(f"{path}: single files are written as .safetensors only")
    bad = {k: v for k, v in (metadata or {}).items() if not (isinstance(k, str) and isinstance(v, str))}
    if bad:
        raise SingleFileError(f"{path}: safetensors metadata must map str to str, got {bad!r}")
    state_dict = pipeline_to_original_state_dict(*_components(pipe_or_components))
    tensors = {key: _tensor_for_file(value, dtype) for key, value in state_dict.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    save_file(tensors, str(partial), metadata={"format": "pt", **(metadata or {})})
    partial.replace(path)
    return path


# ------------------------------------------------------------------------------------------------ loading


def sd15_config_dir(dest: str | Path) -> Path:
    """A diffusers config folder for ``from_single_file(config=...)`` offline: JSON configs and tokenizer/."""
    dest = Path(dest)
    shutil.copytree(SD15_CONFIG_DIR, dest, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
    write_tokenizer_files(dest / "tokenizer")
    return dest


@lru_cache(maxsize=1)
def diffusers_reads_ckpt_weights_only() -> bool:
    """Probe the reader behind ``from_single_file`` with a pickle holding a (harmless) non-tensor object."""
    with tempfile.TemporaryDirectory() as tmp:
        probe = Path(tmp) / "probe.ckpt"
        torch.save({"probe": Fraction(1, 3)}, probe)
        try:
            single_file_utils.load_state_dict(str(probe))
        except Exception:  # refused, as a weights-only reader must
            return True
    return False


def _ckpt_keys(path: Path) -> list[str]:
    """Keys of a pickled checkpoint, read with ``weights_only=True``: refuse pickles that run code."""
    if not diffusers_reads_ckpt_weights_only():
        raise SingleFileError(
            f"{path}: this diffusers version unpickles .ckpt files without weights_only=True; "
            "refusing to load a pickle. Use a .safetensors file."
        )
    try:
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (non-zip) pickles cannot be memory-mapped
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any unpickling failure means: do not load this file
        raise SingleFileError(
            f"{path}: cannot be read safely as a weights-only .ckpt ({type(err).__name__}: {err}). "
            "Convert it to .safetensors on a trusted machine, or use a .safetensors download."
        ) from err
    while isinstance(checkpoint, Mapping) and "state_dict" in checkpoint:
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, Mapping):
        raise SingleFileError(f"{path}: holds a {type(checkpoint).__name__}, not a state dict")
    return list(checkpoint)


def _safetensors_keys(path: Path) -> list[str]:
    try:
        with safe_open(str(path), framework="pt") as handle:
            return list(handle.keys())
    except (SafetensorError, OSError) as err:
        raise SingleFileError(f"{path}: not a readable .safetensors file ({err})") from err


def check_checkpoint(path: str | Path) -> Path:
    """Fail early, naming the file, unless it exists, has a known suffix and holds SD1.x's three parts."""
    path = Path(path)
    if not path.is_file():
        raise SingleFileError(f"{path}: checkpoint file not found (model.path of model.source=single_file)")
    if path.suffix not in SUFFIXES:
        raise SingleFileError(
            f"{path}: unsupported suffix '{path.suffix}'; expected one of {', '.join(SUFFIXES)}"
        )
    keys = _safetensors_keys(path) if path.suffix == ".safetensors" else _ckpt_keys(path)
    missing = [
        part for part, prefix in REQUIRED_PREFIXES.items() if not any(k.startswith(prefix) for k in keys)
    ]
    if missing:
        raise SingleFileError(
            f"{path}: not an SD1.x checkpoint: no {', '.join(missing)} weights "
            f"(expected keys under {', '.join(REQUIRED_PREFIXES[m] for m in missing)}; SD2/SDXL are not supported)"
        )
    return path


def load_single_file(
    path: str | Path, torch_dtype: torch.dtype | None = None, config_dir: str | Path | None = None
) -> StableDiffusionPipeline:
    """Load an SD1.x single file offline into a StableDiffusionPipeline (no safety checker).

    ``config_dir`` defaults to the shipped SD1.5 configs plus the offline CLIP tokenizer.
    """
    path = check_checkpoint(path)
    with tempfile.TemporaryDirectory(prefix="sd15_config_") as tmp:
        config = Path(config_dir) if config_dir is not None else sd15_config_dir(Path(tmp) / "sd15")
        try:
            pipe = StableDiffusionPipeline.from_single_file(
                str(path),
                config=str(config),
                local_files_only=True,
                torch_dtype=torch_dtype,
                **PIPELINE_KWARGS,
            )
        except Exception as err:  # diffusers raises many types; keep the cause chained
            raise SingleFileError(
                f"{path}: diffusers could not load it as SD1.x ({config_dir or 'shipped SD1.5 configs'}): {err}"
            ) from err
    check_tokenizer(pipe, str(path))
    return pipe
