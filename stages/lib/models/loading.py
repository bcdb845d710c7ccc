"""Model loading, written once: the base model from any source, saved pipelines, devices and dtypes."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline

from stages.lib.config.schema import ComputeConfig
from stages.lib.errors import ModelLoadError
from stages.lib.models.pickles import check_pipeline_weights
from stages.lib.models.tokenizer import VOCAB_SIZE
from stages.lib.runtime.timings import phase

log = logging.getLogger(__name__)

SD15_CONFIG_DIR = Path(__file__).parent / "sd15_configs"
MODEL_SOURCES = ("tiny", "hub", "folder", "single_file")
PIPELINE_KWARGS = {"safety_checker": None, "requires_safety_checker": False}


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
    with phase("load"):
        check_pipeline_weights(folder)  # a pickle that could run code: refused in one line, before diffusers
        pipe = StableDiffusionPipeline.from_pretrained(
            folder, torch_dtype=torch_dtype, local_files_only=True, **PIPELINE_KWARGS
        )
        check_tokenizer(pipe, str(folder))
    return pipe
