"""Quiet stage logs: no warning a user can do nothing about, progress bars that refresh sparingly in log files.

:func:`install` runs when the ``stages`` package is imported, before any stage imports diffusers, transformers or
tqdm. It drops two library warnings that say nothing actionable here:

- transformers' "`CLIPImageProcessor` requires torchvision (not installed); falling back to ..." (and the same for
  other image processors): the pipelines never use an image processor, and torchvision is not a dependency;
- diffusers' "No LoRA keys associated to CLIPTextModel ...": the project's LoRAs adapt the UNet only, so a LoRA
  without text-encoder keys is the normal case.

and, where stderr is not a terminal (a log file, CI, ``dvc exp run --queue``), makes tqdm refresh at most every
``LOG_PROGRESS_INTERVAL`` seconds (``TQDM_MININTERVAL``, which tqdm reads when it is imported; an explicit
``TQDM_MININTERVAL`` in the environment wins).
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

LOG_PROGRESS_INTERVAL = 30.0  # seconds between progress-bar refreshes when stderr is not a terminal
TERMINAL_PROGRESS_INTERVAL = 0.1  # tqdm's default

NO_TEXT_ENCODER_LORA = "No LoRA keys associated to CLIPTextModel"
DROPPED = {  # logger name -> the words of the messages it drops
    "transformers.utils.import_utils": "requires torchvision (not installed); falling back to",
    "diffusers.loaders.lora_base": NO_TEXT_ENCODER_LORA,
    "diffusers.loaders.lora_pipeline": NO_TEXT_ENCODER_LORA,
    "diffusers.loaders.peft": NO_TEXT_ENCODER_LORA,
}


class _DropUnactionable(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return DROPPED.get(record.name, "\0") not in record.getMessage()


_FILTER = _DropUnactionable()


def progress_interval() -> float:
    """Seconds between progress-bar refreshes: tqdm's default on a terminal, sparse in a log file."""
    return TERMINAL_PROGRESS_INTERVAL if sys.stderr.isatty() else LOG_PROGRESS_INTERVAL


def one_line_warning(message, category, filename, lineno, line=None) -> str:  # noqa: ANN001 -- warnings' signature
    """``warnings.formatwarning`` for stage processes: one line, like the stages' log lines."""
    return f"WARNING {category.__name__}: {message}\n"


def install() -> None:
    """Drop the unactionable library warnings and make progress bars sparse in log files (idempotent)."""
    for name in DROPPED:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
    if not sys.stderr.isatty():
        os.environ.setdefault("TQDM_MININTERVAL", str(LOG_PROGRESS_INTERVAL))


def install_for_stage() -> None:
    """What a stage process adds to :func:`install`: Python warnings printed on one line."""
    install()
    warnings.formatwarning = one_line_warning
