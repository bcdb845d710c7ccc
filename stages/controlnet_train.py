"""Stage `controlnet_train`: the ControlNet that stage `controlnet` uses, as a diffusers ControlNetModel folder.

With ``controlnet.model_path`` set it imports a pretrained SD1.5 ControlNet (diffusers folder, single file or a
cached hub id; never the network), checks that it fits the model's UNet and saves it. Otherwise it trains one with
the shared training loop: initialised from the model's UNet (diffusers' ``ControlNetModel.from_unet``), that UNet
frozen, on (conditioning map, image) pairs of the instance photos (instance prompt), with
``controlnet.augment.copies`` randomly moved copies of each pair (map and photo moved alike), and, with prior
preservation, the class images (class prompt). dvc.yaml passes the base model, as public SD1.5 ControlNets are
trained on SD1.5 and then steer its fine-tunes: one trained on the DreamBooth UNet itself stops steering once that
UNet has learnt the photos (the tiny profile's DreamBooth: edge F1 gain -0.01, against +0.04 for one trained on
the base; README), and the ControlNet need not retrain when DreamBooth does. ``--model models/dreambooth`` trains
on the fine-tune.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
from PIL import Image

from stages.lib.config.loader import to_flat_dict
from stages.lib.config.schema import ControlNetConfig, PipelineConfig
from stages.lib.errors import StageError
from stages.lib.imaging.annotators import annotate_pixels, get_annotator
from stages.lib.imaging.images import make_grid, view_cell
from stages.lib.imaging.map_transform import random_transform, transform_box, transform_pairs
from stages.lib.models.controlnet_model import (
    ControlledUNet,
    check_compatible,
    control_pipeline,
    load_controlnet,
    new_controlnet,
)
from stages.lib.models.loading import load_pipeline, resolve_device
from stages.lib.runtime.cli import stage_main
from stages.lib.runtime.distributed import is_main_process
from stages.lib.runtime.hashing import hash_files
from stages.lib.runtime.outputs import atomic_dir
from stages.lib.tracking.tracker import StageTracker, stage_run
from stages.lib.training.data import ImageSet, load_instance_set
from stages.lib.training.finetune import (
    FinetunePaths,
    PairAugment,
    enable_gradient_checkpointing,
    finetune,
    place_frozen_modules,
    sample_validation,
    save_validation_grid,
)

LIB = Path(__file__).parent / "lib"
CODE_FILES = [
    Path(__file__),
    LIB / "models" / "controlnet_model.py",
    LIB / "imaging" / "annotators.py",
    LIB / "imaging" / "map_transform.py",
]


def tracked_params(s: ControlNetConfig) -> dict[str, object]:
    """The settings that shaped this ControlNet: the training ones only when it was trained."""
    flat = {k: v for k, v in to_flat_dict(s, "controlnet.").items() if not k.startswith("controlnet.train.")}
    return flat if s.model_path else {**flat, **to_flat_dict(s.train, "controlnet.train.")}


def import_pretrained(s: ControlNetConfig, model_dir: Path, out_dir: Path) -> dict[str, float]:
    """Load the configured ControlNet offline, check it against the model's UNet, save it as a diffusers folder."""
    controlnet = load_controlnet(s.model_path, s.revision)
    check_compatible(controlnet, load_pipeline(model_dir).unet, f"controlnet.model_path={s.model_path}")
    if is_main_process():
        with atomic_dir(out_dir) as tmp:
            controlnet.save_pretrained(tmp, safe_serialization=True)
    return {"pretrained": 1.0, "controlnet_params_M": sum(p.numel() for p in controlnet.parameters()) / 1e6}


def to_pil(maps: torch.Tensor) -> Image.Image:
    """A (3, H, W) conditioning tensor in [0, 1] as an RGB image."""
    return Image.fromarray((maps.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy())


def validation_hook(pipe, controlnet, s: ControlNetConfig, paths: FinetunePaths, tracker: StageTracker):
    """Seeded samples of ``controlnet.prompt`` guided by the first instance photo's map: ``map | samples``."""
    cfg = s.train
    photo = load_instance_set(paths.prepared_dir, cfg.resolution).pixels[:1]
    control = to_pil(annotate_pixels(photo, get_annotator(s.annotator, s.low_threshold, s.high_threshold))[0])

    def validate(step: int) -> None:
        if cfg.num_validation_images <= 0:
            return
        was_training = controlnet.training
        controlnet.eval()
        cn_pipe = control_pipeline(pipe, controlnet)
        cn_pipe.set_progress_bar_config(disable=True)
        images = sample_validation(cn_pipe, cfg, s.prompt, image=control)
        controlnet.train(was_training)
        grid = make_grid([control, *images], columns=len(images) + 1, cell=view_cell(images))
        save_validation_grid(grid, step, paths.reports_dir, tracker)

    return validate


def conditioning(s: ControlNetConfig) -> Callable[[torch.Tensor], torch.Tensor]:
    annotator = get_annotator(s.annotator, s.low_threshold, s.high_threshold)
    return lambda pixels: annotate_pixels(pixels, annotator)


def augmentation(s: ControlNetConfig, seed: int) -> PairAugment | None:
    """``controlnet.augment``: the photos and their maps, then ``copies`` rounds of each pair moved by a random
    transform (seeded by ``seed``), map and photo alike; None when there are no copies."""
    a = s.augment
    if a.copies <= 0:
        return None

    def augment(images: ImageSet, maps: torch.Tensor) -> tuple[ImageSet, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        n, (h, w) = len(images), images.pixels.shape[-2:]
        moves = [random_transform(g, a.mirror, a.min_scale, a.max_shift) for _ in range(a.copies * n)]
        pixels, moved = transform_pairs(
            images.pixels.repeat(a.copies, 1, 1, 1), maps.repeat(a.copies, 1, 1, 1), moves
        )
        boxes = [transform_box(images.face_boxes[k % n], t, h, w) for k, t in enumerate(moves)]
        copies = ImageSet(
            torch.cat([images.pixels, pixels]),
            images.names + [f"{images.names[k % n]}#{k // n + 1}" for k in range(len(moves))],
            images.face_boxes + boxes,
            images.captions * (a.copies + 1),
        )
        return copies, torch.cat([maps, moved])

    return augment


def train_controlnet(
    cfg: PipelineConfig, s: ControlNetConfig, model_dir: Path, out_dir: Path, paths: FinetunePaths, tracker
) -> dict[str, float]:
    """Train a ControlNet from ``model_dir``'s UNet (frozen) on (map, image) pairs; save it to ``out_dir``."""
    train = s.train
    if train.train_text_encoder:
        raise StageError(
            "controlnet.train.train_text_encoder=true is not supported: only the ControlNet trains"
        )
    pipe = load_pipeline(model_dir)
    place_frozen_modules(pipe, train, resolve_device(cfg.compute))
    pipe.unet.requires_grad_(False)
    controlnet = new_controlnet(pipe, train.seed).to(pipe.unet.device).train()
    if train.gradient_checkpointing:
        enable_gradient_checkpointing(controlnet)
    identity = {
        "model": hash_files([model_dir / "unet", model_dir / "vae", model_dir / "text_encoder"]),
        "annotator": [s.annotator, s.low_threshold, s.high_threshold],
        "augment": asdict(s.augment),
        "prompt": s.prompt,
        "code": hash_files(CODE_FILES),
    }
    result = finetune(
        "controlnet",
        train,
        cfg.data,
        pipe,
        dict(controlnet.named_parameters()),
        paths,
        tracker,
        identity,
        denoiser=ControlledUNet(controlnet, pipe.unet),
        conditioning=conditioning(s),
        augment=augmentation(s, train.seed),
        validate_images=validation_hook(pipe, controlnet, s, paths, tracker),
        compute=cfg.compute,
    )
    if is_main_process():  # the other processes of a multi-process run hold the same weights
        with atomic_dir(out_dir) as tmp:
            controlnet.to("cpu").save_pretrained(tmp, safe_serialization=True)
    params_m = sum(p.numel() for p in controlnet.parameters()) / 1e6
    return {**result.metrics, "pretrained": 0.0, "controlnet_params_M": params_m}


def run(cfg: PipelineConfig, model_dir: Path, out_dir: Path, paths: FinetunePaths) -> dict[str, float]:
    """Import (``controlnet.model_path``) or train the ControlNet; write it to ``out_dir``."""
    s = cfg.controlnet
    with stage_run("controlnet_train", cfg.tracking, tracked_params(s), paths.reports_dir) as tracker:
        if s.model_path:
            metrics = import_pretrained(s, model_dir, out_dir)
        else:
            metrics = train_controlnet(cfg, s, model_dir, out_dir, paths, tracker)
        tracker.set_final_metrics(metrics)
    return metrics


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, default=Path("models/base"), help="the UNet to train on")
    parser.add_argument("--out", type=Path, default=Path("models/controlnet"))
    FinetunePaths.add_arguments(parser, "checkpoints/controlnet", "reports/controlnet_train")


def _run(cfg: PipelineConfig, a: argparse.Namespace) -> dict[str, float]:
    return run(cfg, a.model, a.out, FinetunePaths.from_arguments(a))


def main(argv: list[str] | None = None) -> int:
    return stage_main(__doc__ or "", _add_arguments, _run, argv, launch_module="stages.controlnet_train")


if __name__ == "__main__":
    raise SystemExit(main())
