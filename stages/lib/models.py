"""Model loading, written once: the base model from any source, saved pipelines, devices and dtypes."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline

from stages.lib.errors import StageError
from stages.lib.schema import ComputeConfig, ModelConfig
from stages.lib.tokenizer import VOCAB_SIZE

log = logging.getLogger(__name__)

SD15_CONFIG_DIR = Path(__file__).parent / "sd15_configs"
MODEL_SOURCES = ("tiny", "hub", "folder", "single_file")
PIPELINE_KWARGS = {"safety_checker": None, "requires_safety_checker": False}


class ModelLoadError(StageError):
    """The configured model cannot be loaded; the message names the source, path and what to do."""


def resolve_device(cfg: ComputeConfig) -> torch.device:
    """``auto`` picks CUDA when available (the process's own GPU under ``accelerate launch``); an explicit
    ``cuda`` without a GPU is an error."""
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError("compute.device=cuda but no CUDA device is available; use compute.device=auto")
    if cfg.device in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))  # one GPU per launched process
    return torch.device("cpu" if cfg.device == "auto" else cfg.device)


def check_tokenizer(pipe: StableDiffusionPipeline, where: str) -> None:
    """A missing tokenizer/ folder silently yields a 2-token tokenizer: refuse it."""
    if len(pipe.tokenizer) != VOCAB_SIZE:
        raise ModelLoadError(
            f"{where}: tokenizer has {len(pipe.tokenizer)} tokens, expected {VOCAB_SIZE} (CLIP BPE). "
            "Is the tokenizer/ folder missing?"
        )


def is_tiny_default(folder: str | Path) -> bool:
    """Whether a saved pipeline is the embedded default (its provenance file says ``source: tiny``)."""
    source = Path(folder) / "source.json"
    return source.is_file() and json.loads(source.read_text()).get("source") == "tiny"


def allows_half_precision(pipe: StableDiffusionPipeline) -> bool:
    """False for the embedded default: its hand-set VAE carries colour as small offsets that fp16/bf16 round away."""
    return not is_tiny_default(pipe.config._name_or_path or "")


def load_pipeline(folder: str | Path, torch_dtype: torch.dtype | None = None) -> StableDiffusionPipeline:
    """Load a diffusers pipeline folder offline (models/base, models/dreambooth, ...).

    The embedded default always loads in fp32 (see :func:`allows_half_precision`); it is tiny.
    """
    folder = Path(folder)
    if not (folder / "model_index.json").is_file():
        raise ModelLoadError(f"{folder}: not a diffusers pipeline folder (model_index.json missing)")
    if torch_dtype in (torch.float16, torch.bfloat16) and is_tiny_default(folder):
        torch_dtype = None
    from stages.lib.pickles import check_pipeline_weights  # it imports this module

    check_pipeline_weights(folder)  # a pickle that could run code: refused in one line, before diffusers
    pipe = StableDiffusionPipeline.from_pretrained(
        folder, torch_dtype=torch_dtype, local_files_only=True, **PIPELINE_KWARGS
    )
    check_tokenizer(pipe, str(folder))
    return pipe


def load_base_source(cfg: ModelConfig, work_dir: Path) -> StableDiffusionPipeline:
    """Build or load the base model named by ``model.source`` without touching the network."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if cfg.source not in MODEL_SOURCES:
        raise ModelLoadError(f"model.source='{cfg.source}' is not one of {', '.join(MODEL_SOURCES)}")
    if cfg.source == "tiny":
        from stages.lib.tiny_model import build_tiny_pipeline

        return build_tiny_pipeline(cfg.tiny, work_dir / "tokenizer")
    if not cfg.path:
        raise ModelLoadError(
            f"model.source={cfg.source} needs model.path (hub id, folder or checkpoint file)"
        )
    if cfg.source == "single_file":
        from stages.lib.single_file import load_single_file

        return load_single_file(Path(cfg.path))
    if cfg.source == "folder":
        return load_pipeline(cfg.path)
    return _load_from_hub_cache(cfg)


def _load_from_hub_cache(cfg: ModelConfig) -> StableDiffusionPipeline:
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
