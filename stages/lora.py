"""Stage `lora`: a LoRA adapter of one rank on the DreamBooth UNet's attention projections (PEFT).

Writes ``pytorch_lora_weights.safetensors`` that plain diffusers loads with ``pipe.load_lora_weights(folder)``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from diffusers import StableDiffusionPipeline
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig as PeftLoraConfig
from peft.utils import get_peft_model_state_dict

from stages.lib.config.loader import to_flat_dict
from stages.lib.config.schema import LoraConfig, PipelineConfig
from stages.lib.errors import StageError
from stages.lib.layout import LORA_WEIGHT_NAME
from stages.lib.models.loading import load_pipeline, resolve_device
from stages.lib.runtime.cli import stage_main
from stages.lib.runtime.distributed import is_main_process
from stages.lib.runtime.hashing import hash_files
from stages.lib.runtime.outputs import atomic_dir
from stages.lib.runtime.seeding import seeded
from stages.lib.runtime.timings import phase
from stages.lib.tracking.tracker import stage_run
from stages.lib.training.finetune import FinetunePaths, finetune, place_frozen_modules


def peft_config(cfg: LoraConfig, rank: int) -> PeftLoraConfig:
    """PEFT LoRA on the UNet attention projections; alpha defaults to the rank."""
    return PeftLoraConfig(
        r=rank,
        lora_alpha=cfg.alpha or rank,
        init_lora_weights="gaussian",
        target_modules=list(cfg.target_modules),
    )


def run(
    cfg: PipelineConfig, rank: int, dreambooth_dir: Path, out_dir: Path, paths: FinetunePaths
) -> dict[str, float]:
    """Train one adapter of ``rank`` and save it in diffusers' LoRA format."""
    if rank not in cfg.lora.ranks:
        raise StageError(f"--rank {rank} is not in lora.ranks={list(cfg.lora.ranks)}")
    train = cfg.lora.train
    if train.train_text_encoder:
        raise StageError("lora.train.train_text_encoder=true is not supported: LoRA trains the UNet only")
    pipe = load_pipeline(dreambooth_dir)
    place_frozen_modules(pipe, train, resolve_device(cfg.compute))
    pipe.unet.requires_grad_(False)
    with seeded(train.seed):  # PEFT draws lora_A from torch's global generator
        pipe.unet.add_adapter(peft_config(cfg.lora, rank))
    params = {n: p for n, p in pipe.unet.named_parameters() if p.requires_grad}
    flat = {
        **to_flat_dict(train, "lora.train."),
        "lora.rank": rank,
        "lora.alpha": cfg.lora.alpha or rank,
        "lora.target_modules": ",".join(cfg.lora.target_modules),
        **to_flat_dict(cfg.data, "data."),
    }
    with stage_run(f"lora_r{rank}", cfg.tracking, flat, paths.reports_dir) as tracker:
        identity = {
            "rank": rank,
            "alpha": cfg.lora.alpha,
            "targets": list(cfg.lora.target_modules),
            "dreambooth": hash_files([dreambooth_dir]),
        }
        result = finetune(
            f"lora_r{rank}", train, cfg.data, pipe, params, paths, tracker, identity, compute=cfg.compute
        )
        layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet))
        if is_main_process():
            with phase("save"), atomic_dir(out_dir) as tmp:
                StableDiffusionPipeline.save_lora_weights(
                    tmp,
                    unet_lora_layers=layers,
                    weight_name=LORA_WEIGHT_NAME,
                    unet_lora_adapter_metadata=pipe.unet.peft_config[
                        "default"
                    ].to_dict(),  # keeps alpha != rank
                )
        metrics = {
            **result.metrics,
            "rank": float(rank),
            "lora_params": float(sum(p.numel() for p in params.values())),
        }
        tracker.set_final_metrics(metrics)
    return metrics


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--dreambooth", type=Path, default=Path("models/dreambooth"))
    parser.add_argument("--out", type=Path, required=True)
    FinetunePaths.add_arguments(parser, checkpoints=None, reports=None)


def _run(cfg: PipelineConfig, a: argparse.Namespace) -> dict[str, float]:
    return run(cfg, a.rank, a.dreambooth, a.out, FinetunePaths.from_arguments(a))


def main(argv: list[str] | None = None) -> int:
    return stage_main(__doc__ or "", _add_arguments, _run, argv, launch_module="stages.lora")


if __name__ == "__main__":
    raise SystemExit(main())
