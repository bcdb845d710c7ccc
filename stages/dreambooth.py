"""Stage `dreambooth`: full-UNet fine-tuning with prior preservation; saves a complete diffusers pipeline."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline

from stages.lib.config.loader import to_flat_dict
from stages.lib.config.schema import PipelineConfig
from stages.lib.models.loading import load_pipeline, resolve_device
from stages.lib.runtime.cli import stage_main
from stages.lib.runtime.distributed import is_main_process
from stages.lib.runtime.hashing import hash_files
from stages.lib.runtime.outputs import atomic_dir
from stages.lib.runtime.timings import phase
from stages.lib.tracking.tracker import stage_run
from stages.lib.training.finetune import FinetunePaths, finetune, place_frozen_modules


def run(cfg: PipelineConfig, base_dir: Path, out_dir: Path, paths: FinetunePaths) -> dict[str, float]:
    """Train every UNet parameter; write the fine-tuned pipeline to ``out_dir`` (safetensors)."""
    train = cfg.dreambooth
    pipe = load_pipeline(base_dir)
    place_frozen_modules(pipe, train, resolve_device(cfg.compute))
    pipe.unet.requires_grad_(True)
    params = dict(pipe.unet.named_parameters())
    if train.train_text_encoder:
        pipe.text_encoder.requires_grad_(True).train()
        params.update({f"text_encoder.{n}": p for n, p in pipe.text_encoder.named_parameters()})
    flat = {**to_flat_dict(train, "dreambooth."), **to_flat_dict(cfg.data, "data.")}
    with stage_run("dreambooth", cfg.tracking, flat, paths.reports_dir) as tracker:
        result = finetune(
            "dreambooth",
            train,
            cfg.data,
            pipe,
            params,
            paths,
            tracker,
            identity={"base": hash_files([base_dir])},
            compute=cfg.compute,
        )
        if is_main_process():  # the other processes of a multi-process run hold the same weights
            with phase("save"):
                save_finetuned(pipe, base_dir, out_dir, trained_text_encoder=train.train_text_encoder)
        tracker.set_final_metrics(result.metrics)
    return result.metrics


def save_finetuned(
    pipe: StableDiffusionPipeline, base_dir: Path, out_dir: Path, trained_text_encoder: bool
) -> None:
    """``out_dir`` (atomically): ``base_dir`` with the trained UNet (and text encoder) saved over it in fp32; every
    other file, the frozen VAE and text encoder included, is the base's own (training may hold those in bf16:
    saving them would round the base's weights, where diffusers' train_dreambooth.py reloads them from the base)."""
    trained = {"unet": pipe.unet} | ({"text_encoder": pipe.text_encoder} if trained_text_encoder else {})

    def untrained(folder: str, names: list[str]) -> list[str]:  # the trained modules' folders are not copied
        return [n for n in names if n in trained] if Path(folder) == base_dir else []

    with atomic_dir(out_dir) as tmp:
        shutil.copytree(base_dir, tmp, ignore=untrained, dirs_exist_ok=True)
        for name, module in trained.items():
            module.to("cpu", torch.float32).save_pretrained(tmp / name, safe_serialization=True)


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", type=Path, default=Path("models/base"))
    parser.add_argument("--out", type=Path, default=Path("models/dreambooth"))
    FinetunePaths.add_arguments(parser, "checkpoints/dreambooth", "reports/dreambooth")


def _run(cfg: PipelineConfig, a: argparse.Namespace) -> dict[str, float]:
    return run(cfg, a.base, a.out, FinetunePaths.from_arguments(a))


def main(argv: list[str] | None = None) -> int:
    return stage_main(__doc__ or "", _add_arguments, _run, argv, launch_module="stages.dreambooth")


if __name__ == "__main__":
    raise SystemExit(main())
