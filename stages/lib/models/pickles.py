"""Pickled weight files (``.bin``, ``.pt``, ``.pth``, ``.ckpt``): read weights-only, or refused in one line.

Unpickling an arbitrary file can run code; ``torch.load(weights_only=True)`` reads tensors and plain containers and
refuses anything else with a long multi-line explanation. :func:`load_weights_only` turns that refusal into one
line naming the file, the object it would have created and what to use instead.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from stages.lib.errors import ModelLoadError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
SAFE_ADVICE = (
    "use a .safetensors file (convert this one only on a machine where you trust where it came from)"
)


def refusal(path: Path, err: BaseException) -> str:
    """The one-line message for a pickle that ``torch.load(weights_only=True)`` refused or could not read."""
    text = str(err)
    found = re.search(r"GLOBAL ([\w.]+)", text)
    if found:
        return (
            f"{path}: refused: this pickle holds a {found.group(1)} object, and unpickling it could run code; "
            f"{SAFE_ADVICE}"
        )
    detail = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", text)
    lines = [line for line in text.splitlines() if line.strip()]
    reason = detail.group(1) if detail else (lines[0][:200] if lines else type(err).__name__)
    return f"{path}: cannot be read as a weights-only pickle ({reason}): is it damaged, or not a checkpoint? {SAFE_ADVICE}"


def load_weights_only(path: str | Path) -> Any:
    """The content of a pickled checkpoint read with ``weights_only=True`` (memory-mapped when it can be), or
    ModelLoadError naming the file when it holds anything else or cannot be read."""
    path = Path(path)
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:  # legacy (non-zip) pickles cannot be memory-mapped
            if "mmap" not in str(err):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any unpickling failure means: do not load this file
        raise ModelLoadError(refusal(path, err)) from err


def check_pipeline_weights(folder: Path) -> None:
    """ModelLoadError for a diffusers pipeline folder whose component (unet/, vae/, text_encoder/...) has only
    pickled weights that hold more than tensors; weights-only pickles and .safetensors pass."""
    for component in sorted(p for p in folder.iterdir() if p.is_dir()):
        files = [p for p in component.iterdir() if p.is_file()]
        if any(p.suffix == ".safetensors" for p in files):
            continue
        for pickled in sorted(p for p in files if p.suffix in PICKLE_SUFFIXES):
            load_weights_only(pickled)
