"""Seeded randomness for code that draws from torch's global generator (weight initialisers)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run the block with torch's global generators (CPU and CUDA) seeded by ``seed``; restore them after.

    torch seeds its global generator differently in every process, so an initialiser that draws from it (PEFT's
    LoRA ``lora_A``, a ControlNet's conditioning embedding) gives other weights on every run unless seeded.
    """
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield
