"""SD1.x single files: diffusers -> original conversion, written files reloaded by diffusers' own loaders."""

from __future__ import annotations

import gc
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
from diffusers.loaders import single_file_utils
from peft import LoraConfig
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel

from stages.lib.models.loading import SD15_CONFIG_DIR
from stages.lib.models.single_file import (
    SingleFileError,
    diffusers_reads_ckpt_weights_only,
    load_single_file,
    pipeline_to_original_state_dict,
    save_single_file,
    sd15_config_dir,
)
from stages.lib.models.tokenizer import VOCAB_SIZE

Components = dict[str, nn.Module]

TINY_LAYOUTS = {
    "2-blocks-1-layer": {"unet_channels": (32, 64), "layers": 1, "vae_channels": (32, 64, 64)},
    "3-blocks-2-layers": {"unet_channels": (32, 32, 64), "layers": 2, "vae_channels": (32, 32, 64)},
}


def randomize_(module: nn.Module, seed: int) -> nn.Module:
    """Fill every floating tensor with seeded noise, so that a swapped or dropped tensor cannot go unseen."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in module.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(torch.randn(tensor.shape, generator=generator, dtype=tensor.dtype))
    return module


def tiny_components(unet_channels: tuple[int, ...], layers: int, vae_channels: tuple[int, ...]) -> Components:
    """An SD1.x-shaped UNet / VAE / CLIP text tower, small enough for a fast test."""
    n = len(unet_channels)
    unet = UNet2DConditionModel(
        sample_size=8,
        block_out_channels=unet_channels,
        layers_per_block=layers,
        down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
        cross_attention_dim=32,
    )
    vae = AutoencoderKL(
        block_out_channels=vae_channels,
        layers_per_block=layers,
        down_block_types=("DownEncoderBlock2D",) * len(vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(vae_channels),
        latent_channels=4,
    )
    text_config = CLIPTextConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
    )
    parts = {"unet": unet, "vae": vae, "text_encoder": CLIPTextModel(text_config)}
    return {name: randomize_(part, seed) for seed, (name, part) in enumerate(parts.items())}


def write_config_dir(dest: Path, parts: Components) -> Path:
    """SD1.5's model_index, scheduler and tokenizer with the configs of ``parts``: from_single_file's config."""
    sd15_config_dir(dest)
    parts["unet"].save_config(dest / "unet")
    parts["vae"].save_config(dest / "vae")
    parts["text_encoder"].config.save_pretrained(dest / "text_encoder")
    return dest


def assert_same_weights(loaded: Components, source: Components) -> None:
    """Every tensor of every component equal to the source (after casting to the source's dtype)."""
    for name, module in source.items():
        expected = module.state_dict()
        got = loaded[name].state_dict()
        assert got.keys() == expected.keys(), name
        different = [k for k, v in expected.items() if not torch.equal(got[k].to(v.dtype), v)]
        assert not different, f"{name}: {len(different)} tensors differ, e.g. {different[:3]}"


def loaded_components(pipe) -> Components:
    return {"unet": pipe.unet, "vae": pipe.vae, "text_encoder": pipe.text_encoder}


# ------------------------------------------------------------------------------------------- fast tests


@pytest.mark.parametrize("layout", TINY_LAYOUTS)
def test_tiny_round_trip_safetensors(layout: str, tmp_path: Path) -> None:
    parts = tiny_components(**TINY_LAYOUTS[layout])
    path = save_single_file(parts, tmp_path / "tiny.safetensors", metadata={"sks": "person"})
    with safe_open(str(path), framework="pt") as handle:
        assert handle.metadata() == {"format": "pt", "sks": "person"}
        assert {k.split(".")[0] for k in handle.keys()} == {"model", "first_stage_model", "cond_stage_model"}

    pipe = load_single_file(path, config_dir=write_config_dir(tmp_path / "config", parts))

    assert len(pipe.tokenizer) == VOCAB_SIZE
    assert isinstance(pipe.scheduler, PNDMScheduler)
    assert_same_weights(loaded_components(pipe), parts)
    positions = pipe.text_encoder.get_buffer("embeddings.position_ids")
    assert torch.equal(positions.flatten(), torch.arange(77))


def test_tiny_round_trip_ckpt_fp16(tmp_path: Path) -> None:
    """A pickled .ckpt (nested under "state_dict", as the originals are) in fp16 loads equally."""
    parts = tiny_components(**TINY_LAYOUTS["2-blocks-1-layer"])
    state_dict = pipeline_to_original_state_dict(parts["unet"], parts["vae"], parts["text_encoder"])
    half = {k: v.half() if v.is_floating_point() else v for k, v in state_dict.items()}
    torch.save({"state_dict": half, "global_step": 0}, tmp_path / "tiny.ckpt")
    pipe = load_single_file(tmp_path / "tiny.ckpt", config_dir=write_config_dir(tmp_path / "config", parts))
    assert_same_weights(loaded_components(pipe), {k: m.half() for k, m in parts.items()})


def test_sd15_layout_names_and_shapes() -> None:
    """The full SD1.5 layout (on the meta device: no memory) gives the original names and 1x1 VAE attention."""
    parts = sd15_components(device="meta")
    counts = {name: sum(p.numel() for p in part.parameters()) for name, part in parts.items()}
    assert counts == {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480}
    state_dict = pipeline_to_original_state_dict(parts["unet"], parts["vae"], parts["text_encoder"])
    shapes = {key: tuple(value.shape) for key, value in state_dict.items()}
    expected = {
        "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
        "model.diffusion_model.input_blocks.3.0.op.weight": (320, 320, 3, 3),
        "model.diffusion_model.input_blocks.11.0.emb_layers.1.weight": (1280, 1280),
        "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight": (1280, 768),
        "model.diffusion_model.output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.output_blocks.5.2.conv.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.output_blocks.11.0.skip_connection.weight": (320, 640, 1, 1),
        "model.diffusion_model.out.2.weight": (4, 320, 3, 3),
        "first_stage_model.encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
        "first_stage_model.decoder.mid.attn_1.proj_out.weight": (512, 512, 1, 1),
        "first_stage_model.decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
        "first_stage_model.decoder.up.0.block.2.conv2.weight": (128, 128, 3, 3),
        "first_stage_model.encoder.down.1.block.0.nin_shortcut.weight": (256, 128, 1, 1),
        "first_stage_model.quant_conv.weight": (8, 8, 1, 1),
        "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2.weight": (768, 3072),
        "cond_stage_model.transformer.text_model.embeddings.position_ids": (1, 77),
        "cond_stage_model.transformer.text_model.final_layer_norm.weight": (768,),
    }
    assert {k: shapes.get(k) for k in expected} == expected
    assert len(shapes) == 686 + 248 + 196 + 1  # every parameter once, plus position_ids


def test_unmapped_parameter_is_an_error() -> None:
    """A UNet that is not SD1.x-shaped (class embedding) is refused instead of written half-converted."""
    parts = tiny_components(**TINY_LAYOUTS["2-blocks-1-layer"])
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        class_embed_type="timestep",
    )
    with pytest.raises(SingleFileError, match="class_embedding.linear_1.weight"):
        pipeline_to_original_state_dict(unet, parts["vae"], parts["text_encoder"])


def test_unmerged_lora_is_an_error() -> None:
    parts = tiny_components(**TINY_LAYOUTS["2-blocks-1-layer"])
    parts["unet"].add_adapter(
        LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    )
    with pytest.raises(SingleFileError, match="un-merged LoRA adapter: merge it first"):
        pipeline_to_original_state_dict(parts["unet"], parts["vae"], parts["text_encoder"])


# ------------------------------------------------------------------------------------------ error cases


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SingleFileError, match=r"absent\.safetensors: checkpoint file not found"):
        load_single_file(tmp_path / "absent.safetensors")


def test_wrong_suffix(tmp_path: Path) -> None:
    path = tmp_path / "model.bin"
    path.write_bytes(b"\0" * 16)
    with pytest.raises(SingleFileError, match=r"model\.bin: unsupported suffix '\.bin'"):
        load_single_file(path)


def test_safetensors_without_sd_weights(tmp_path: Path) -> None:
    path = tmp_path / "lora.safetensors"
    save_file({"lora_unet_down.weight": torch.zeros(2, 2)}, str(path))
    with pytest.raises(SingleFileError, match=r"lora\.safetensors: not an SD1\.x checkpoint: no UNet, VAE"):
        load_single_file(path)


def test_corrupt_safetensors(tmp_path: Path) -> None:
    path = tmp_path / "broken.safetensors"
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(SingleFileError, match=r"broken\.safetensors: not a readable \.safetensors"):
        load_single_file(path)


class Payload:
    """Any class in a pickle makes a weights-only load refuse it."""


def test_ckpt_needing_arbitrary_unpickling_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "unsafe.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.x": torch.zeros(1)}, "callback": Payload()}, path)
    with pytest.raises(SingleFileError, match=r"unsafe\.ckpt: cannot be read safely as a weights-only"):
        load_single_file(path)


def test_ckpt_refused_when_diffusers_would_unpickle_freely(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": {}}, path)
    monkeypatch.setattr(
        single_file_utils, "load_state_dict", lambda p, **kw: torch.load(p, weights_only=False)
    )
    diffusers_reads_ckpt_weights_only.cache_clear()
    try:
        with pytest.raises(SingleFileError, match=r"model\.ckpt: this diffusers version unpickles"):
            load_single_file(path)
    finally:
        diffusers_reads_ckpt_weights_only.cache_clear()


def test_save_refuses_other_suffix_and_bad_metadata(tmp_path: Path) -> None:
    parts = tiny_components(**TINY_LAYOUTS["2-blocks-1-layer"])
    with pytest.raises(SingleFileError, match=r"model\.ckpt: single files are written as \.safetensors"):
        save_single_file(parts, tmp_path / "model.ckpt")
    with pytest.raises(SingleFileError, match="metadata must map str to str"):
        save_single_file(parts, tmp_path / "model.safetensors", metadata={"steps": 800})  # type: ignore[dict-item]
    with pytest.raises(SingleFileError, match="unet, vae and text_encoder"):
        save_single_file({"unet": parts["unet"]}, tmp_path / "model.safetensors")


# --------------------------------------------------------------------------------------- full size (slow)


def sd15_components(device: str = "cpu", dtype: torch.dtype = torch.float16, seed: int = 0) -> Components:
    """SD1.5's architecture from the shipped configs; on CPU filled with seeded noise in ``dtype``."""
    with torch.device("meta"):
        parts: Components = {
            "unet": UNet2DConditionModel.from_config(
                UNet2DConditionModel.load_config(SD15_CONFIG_DIR / "unet")
            ),
            "vae": AutoencoderKL.from_config(AutoencoderKL.load_config(SD15_CONFIG_DIR / "vae")),
            "text_encoder": CLIPTextModel(CLIPTextConfig.from_pretrained(SD15_CONFIG_DIR / "text_encoder")),
        }
    if device == "meta":
        return parts
    return {
        name: randomize_(part.to(dtype).to_empty(device=device), seed + i)
        for i, (name, part) in enumerate(parts.items())
    }


@pytest.mark.slow
def test_full_size_sd15_single_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A full-size SD1.5 (random weights, fp16) as ONE original-layout file, loaded offline by load_single_file."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    parts = sd15_components()
    assert sum(p.numel() for p in parts["unet"].parameters()) == 859_520_964
    path = save_single_file(parts, tmp_path / "sd15.safetensors")
    gc.collect()

    pipe = load_single_file(path, torch_dtype=torch.float16)

    assert len(pipe.tokenizer) == VOCAB_SIZE
    assert [type(m).__name__ for m in loaded_components(pipe).values()] == [
        "UNet2DConditionModel",
        "AutoencoderKL",
        "CLIPTextModel",
    ]
    assert isinstance(pipe.scheduler, PNDMScheduler) and pipe.safety_checker is None
    assert_same_weights(loaded_components(pipe), parts)
    del pipe, parts
    gc.collect()
