"""Optimizer and learning-rate schedule from a TrainConfig."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable

import torch
from diffusers.optimization import get_scheduler

from stages.lib.config.checks import OPTIMIZERS
from stages.lib.config.schema import TrainConfig
from stages.lib.errors import ConfigError

log = logging.getLogger(__name__)


def _adamw8bit(
    params: list[torch.nn.Parameter], cfg: TrainConfig, device: torch.device
) -> torch.optim.Optimizer:
    """bitsandbytes' 8-bit AdamW on CUDA; torch AdamW with a RuntimeWarning where it cannot run."""
    if device.type == "cuda":
        try:
            import bitsandbytes as bnb

            return bnb.optim.AdamW8bit(params, **_adam_kwargs(cfg))
        except ImportError:
            reason = "bitsandbytes is not installed: pip install -e '.[cuda]' (`make setup` does where nvidia-smi works)"
        except RuntimeError as err:
            reason = f"bitsandbytes failed ({err})"
    else:
        reason = f"8-bit AdamW needs CUDA, this run is on {device.type}"
    msg = f"optimizer=adamw8bit: {reason}; falling back to torch.optim.AdamW (fp32 states)"
    warnings.warn(msg, RuntimeWarning, stacklevel=3)  # once per place that builds the optimizer
    return _torch_adamw(params, cfg, device)


def _torch_adamw(
    params: list[torch.nn.Parameter], cfg: TrainConfig, device: torch.device
) -> torch.optim.Optimizer:
    """torch AdamW, fused into one kernel per step where torch has one (CPU and CUDA, floating-point weights)
    instead of one per tensor: what makes the tiny model's CPU step fast (benchmarks/train_step.py --model tiny)."""
    fused = device.type in ("cpu", "cuda") and all(p.is_floating_point() for p in params)
    return torch.optim.AdamW(params, **_adam_kwargs(cfg), fused=fused or None)


def _adam_kwargs(cfg: TrainConfig) -> dict[str, object]:
    return {
        "lr": cfg.learning_rate,
        "betas": (cfg.adam_beta1, cfg.adam_beta2),
        "weight_decay": cfg.adam_weight_decay,
        "eps": cfg.adam_epsilon,
    }


def _flat_adamw8bit(params: list[torch.nn.Parameter], cfg: TrainConfig, device: torch.device):
    """One-kernel 8-bit AdamW over a flat parameter buffer, or None (with the reason logged) where it cannot run."""
    from stages.lib.training.flat_adamw8bit import FlatAdamW8bit, flat_adamw8bit_available

    usable, reason = flat_adamw8bit_available(device)
    if not usable:
        log.warning(
            "optimizer=adamw8bit: the flat 8-bit kernel is unavailable (%s); using bitsandbytes", reason
        )
        return None
    try:  # builds (and on CUDA compiles and launches once) the kernel
        return FlatAdamW8bit(params, **_adam_kwargs(cfg))
    except Exception as err:  # a kernel that fails to build must not stop training: bitsandbytes still can
        log.warning("optimizer=adamw8bit: the flat 8-bit kernel failed (%s); using bitsandbytes", err)
        return None


def make_optimizer(
    params: Iterable[torch.nn.Parameter], cfg: TrainConfig, device: torch.device, flat: bool = False
) -> torch.optim.Optimizer:
    """Build ``cfg.optimizer`` over ``params``; ``flat`` (CUDA, compute.flat_optimizer) makes adamw8bit one
    kernel over a flat parameter buffer (:mod:`stages.lib.training.flat_adamw8bit`) instead of bitsandbytes' per-tensor
    steps."""
    params = list(params)
    if cfg.optimizer == "adamw8bit":
        optimizer = _flat_adamw8bit(params, cfg, device) if flat and device.type == "cuda" else None
        return optimizer or _adamw8bit(params, cfg, device)
    if cfg.optimizer == "adamw":
        return _torch_adamw(params, cfg, device)
    if cfg.optimizer == "prodigy":
        from prodigyopt import Prodigy

        return Prodigy(params, **_adam_kwargs(cfg))
    raise ConfigError(f"optimizer='{cfg.optimizer}' is not one of {', '.join(OPTIMIZERS)}")


def make_lr_scheduler(
    optimizer: torch.optim.Optimizer, cfg: TrainConfig
) -> torch.optim.lr_scheduler.LRScheduler:
    """diffusers' named schedules (constant, constant_with_warmup, linear, cosine, ...)."""
    try:
        return get_scheduler(
            cfg.lr_scheduler,
            optimizer=optimizer,
            num_warmup_steps=cfg.lr_warmup_steps,
            num_training_steps=cfg.max_train_steps,
        )
    except ValueError as err:
        raise ConfigError(f"lr_scheduler='{cfg.lr_scheduler}': {err}") from err
