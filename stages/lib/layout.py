"""The on-disk contract between stages: the file names one stage writes and another reads.

Folder paths themselves live in dvc.yaml and reach the stages as arguments; what is fixed inside those folders is
named here, once.
"""

from __future__ import annotations

from pathlib import Path

from stages.lib.config.checks import untrained_rank_message
from stages.lib.config.schema import LoraConfig
from stages.lib.errors import StageError

SOURCE_FILE = "source.json"  # base model provenance, written by base, copied by dreambooth, read by convert
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # each lora@<r> folder's adapter (diffusers' name)


def lora_dir(lora_root: Path, rank: int) -> Path:
    """The folder of the rank-``rank`` adapter under ``lora_root`` (``models/lora``)."""
    return lora_root / f"r{rank}"


def featured_lora_dir(cfg: LoraConfig, lora_root: Path) -> Path:
    """The adapter that downstream stages feature (``lora.rank``); it must be one of ``lora.ranks``."""
    if cfg.rank not in cfg.ranks:
        raise StageError(untrained_rank_message(cfg.rank, list(cfg.ranks)))
    return lora_dir(lora_root, cfg.rank)
