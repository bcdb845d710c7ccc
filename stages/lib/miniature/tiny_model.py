"""The embedded default: a tiny, seeded pipeline with the real SD1.5 component classes.

The UNet and the text encoder start random (the ``base`` stage then pretrains the UNet on the miniature world); the
VAE is hand-set to a colour-preserving 4x autoencoder (stages/lib/miniature/tiny_vae.py).
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from stages.lib.config.schema import TinyModelConfig
from stages.lib.miniature.tiny_vae import make_colour_preserving
from stages.lib.models.loading import SD15_CONFIG_DIR
from stages.lib.models.tokenizer import MODEL_MAX_LENGTH, VOCAB_SIZE, build_clip_tokenizer

VAE_SCALE = 4  # three VAE blocks downsample twice


def tiny_unet(cfg: TinyModelConfig) -> UNet2DConditionModel:
    """SD1.5's UNet blocks in miniature; cross-attention on the lower-resolution levels only (the 2-core budget)."""
    n = len(cfg.unet_channels)
    return UNet2DConditionModel(
        sample_size=cfg.sample_size // VAE_SCALE,
        in_channels=cfg.latent_channels,
        out_channels=cfg.latent_channels,
        block_out_channels=tuple(cfg.unet_channels),
        layers_per_block=cfg.unet_layers_per_block,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",),
        norm_num_groups=cfg.unet_norm_groups,
        cross_attention_dim=cfg.text_hidden_size,
        attention_head_dim=cfg.attention_head_dim,
    )


def tiny_vae(cfg: TinyModelConfig) -> AutoencoderKL:
    """An AutoencoderKL with SD's block types and colour-preserving hand-set weights (4x downsampling)."""
    n = len(cfg.vae_channels)
    if 2 ** (n - 1) != VAE_SCALE:
        raise ValueError(f"model.tiny.vae_channels must have 3 entries (downsampling x{VAE_SCALE}), got {n}")
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(cfg.vae_channels),
        layers_per_block=1,
        latent_channels=cfg.latent_channels,
        sample_size=cfg.sample_size,
        norm_num_groups=cfg.vae_norm_groups,
    )
    try:
        return make_colour_preserving(vae)
    except ValueError as err:
        raise ValueError(f"model.tiny.vae_channels / vae_norm_groups: {err}") from err


def tiny_text_encoder(cfg: TinyModelConfig) -> CLIPTextModel:
    """A CLIP text tower with the full CLIP vocabulary and SD1.5's 77-token context."""
    config = CLIPTextConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=cfg.text_hidden_size,
        intermediate_size=cfg.text_intermediate_size,
        num_hidden_layers=cfg.text_layers,
        num_attention_heads=cfg.text_heads,
        max_position_embeddings=MODEL_MAX_LENGTH,
        hidden_act="quick_gelu",
        projection_dim=cfg.text_hidden_size,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    return CLIPTextModel(config)


def build_tiny_pipeline(cfg: TinyModelConfig, tokenizer_dir: str | Path) -> StableDiffusionPipeline:
    """Build the tiny pipeline deterministically: the same config and seed give identical weights."""
    torch.manual_seed(cfg.seed)
    unet = tiny_unet(cfg)
    torch.manual_seed(cfg.seed + 1)
    vae = tiny_vae(cfg)
    torch.manual_seed(cfg.seed + 2)
    text_encoder = tiny_text_encoder(cfg)
    scheduler = PNDMScheduler.from_pretrained(SD15_CONFIG_DIR, subfolder="scheduler")
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=build_clip_tokenizer(tokenizer_dir),
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
