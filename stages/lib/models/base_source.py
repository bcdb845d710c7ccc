"""The base model from the source ``model.source`` names: the miniature, a hub id, a diffusers folder or one file."""

from __future__ import annotations

import os
from pathlib import Path

from diffusers import StableDiffusionPipeline

from stages.lib.config.schema import ModelConfig
from stages.lib.miniature.tiny_model import build_tiny_pipeline
from stages.lib.models.loading import (
    MODEL_SOURCES,
    PIPELINE_KWARGS,
    ModelLoadError,
    check_tokenizer,
    load_pipeline,
)
from stages.lib.models.single_file import load_single_file


def load_base_source(cfg: ModelConfig, work_dir: Path) -> StableDiffusionPipeline:
    """Build or load the base model named by ``model.source`` without touching the network."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if cfg.source not in MODEL_SOURCES:
        raise ModelLoadError(f"model.source='{cfg.source}' is not one of {', '.join(MODEL_SOURCES)}")
    if cfg.source == "tiny":
        return build_tiny_pipeline(cfg.tiny, work_dir / "tokenizer")
    if not cfg.path:
        raise ModelLoadError(
            f"model.source={cfg.source} needs model.path (hub id, folder or checkpoint file)"
        )
    if cfg.source == "single_file":
        return load_single_file(Path(cfg.path))
    if cfg.source == "folder":
        return load_pipeline(cfg.path)
    return _load_from_hub_cache(cfg)


def _load_from_hub_cache(cfg: ModelConfig) -> StableDiffusionPipeline:
    """A hub id at a pinned revision, from the local Hugging Face cache only."""
    if not cfg.revision:
        raise ModelLoadError(f"model.source=hub needs a pinned model.revision for '{cfg.path}'")
    try:
        pipe = StableDiffusionPipeline.from_pretrained(
            cfg.path, revision=cfg.revision, local_files_only=True, **PIPELINE_KWARGS
        )
    except (OSError, ValueError) as err:
        raise ModelLoadError(
            f"model.path='{cfg.path}' at revision {cfg.revision} is not in the local Hugging Face cache "
            f"({err}). Download it on a machine with network access (huggingface-cli download "
            f"{cfg.path} --revision {cfg.revision}) or use model.source=folder/single_file."
        ) from err
    check_tokenizer(pipe, cfg.path)
    return pipe
