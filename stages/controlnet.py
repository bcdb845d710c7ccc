"""Stage `controlnet`: the personalised subject under spatial control, and how well the control is followed.

For each control image (``controlnet.control_images``, or the first ``num_control_images`` prepared photos) the
annotator makes a conditioning map, moved by ``controlnet.map_transform`` (zoomed out, shifted, mirrored: a
layout other than the photos'); the DreamBooth model and the DreamBooth model + the featured LoRA generate
the ``controlnet.prompt`` guided by the ControlNet (``models/controlnet``), and the plain DreamBooth pipeline
generates it without ControlNet from the same seed. Sampling settings (size, steps, guidance, negative prompt,
seed) are infer's. Metric: F1 of the generated image's edges (same annotator) against the control map, with a
pixel tolerance, per variant; grids ``control map | DreamBooth | + LoRA | without ControlNet`` per control image.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import ControlNetModel
from PIL import Image

from stages.lib.config.loader import to_flat_dict
from stages.lib.config.schema import ControlNetConfig, PipelineConfig
from stages.lib.errors import StageError
from stages.lib.imaging.annotators import canny_edges, get_annotator
from stages.lib.imaging.images import list_images, make_grid, save_image, to_rgb
from stages.lib.imaging.map_transform import Transform, transform_map_image
from stages.lib.layout import LORA_WEIGHT_NAME, featured_lora_dir
from stages.lib.metrics.edge_metrics import EdgeScore, edge_score, tolerance_pixels
from stages.lib.models.controlnet_model import ControlNetLoadError, check_compatible, control_pipeline
from stages.lib.models.loading import load_pipeline, resolve_device
from stages.lib.runtime.cli import stage_main
from stages.lib.runtime.outputs import atomic_dir
from stages.lib.sampling.sampler import Job, prepare_for_sampling, sample
from stages.lib.tracking.tracker import stage_run

VARIANTS = ("dreambooth", "lora", "without_controlnet")
MIN_CELL = 128  # grid cells are at least this wide so that captions stay readable


@dataclass
class ControlPaths:
    dreambooth: Path
    lora_root: Path
    controlnet: Path
    prepared: Path
    reports: Path


def fit(image: Image.Image, width: int, height: int) -> Image.Image:
    """Centre-crop ``image`` to the aspect of ``width`` x ``height`` and resize it to that size."""
    image = to_rgb(image)
    scale = min(image.width / width, image.height / height)
    w, h = round(width * scale), round(height * scale)
    left, top = (image.width - w) // 2, (image.height - h) // 2
    return image.crop((left, top, left + w, top + h)).resize((width, height), Image.Resampling.BICUBIC)


def control_sources(
    s: ControlNetConfig, prepared: Path, width: int, height: int
) -> list[tuple[str, Image.Image]]:
    """(name, image) of each control image: the listed files, or the first prepared photos."""
    if s.control_images:
        files = [(f"controlnet.control_images[{i}]", Path(p)) for i, p in enumerate(s.control_images)]
    else:
        found = list_images(prepared) if prepared.is_dir() else []
        if not found:
            raise StageError(
                f"{prepared}: no prepared photos to derive control images from; run `dvc repro prep`"
            )
        files = [(str(prepared), f) for f in found[: s.num_control_images]]
    sources = []
    for key, path in files:
        try:
            with Image.open(path) as im:
                sources.append((path.stem, fit(im, width, height)))
        except (OSError, ValueError) as err:
            raise StageError(f"{key}: cannot read control image {path} ({err})") from err
    return sources


def generate(cfg: PipelineConfig, s: ControlNetConfig, paths: ControlPaths, controls: list[Image.Image]):
    """Images per variant, one generator per image seeded ``infer.seed + index`` (shared by the variants)."""
    device = resolve_device(cfg.compute)
    dtype = torch.float16 if device.type == "cuda" else None
    lora_dir = featured_lora_dir(cfg.lora, paths.lora_root)
    if not (lora_dir / LORA_WEIGHT_NAME).is_file():
        raise StageError(f"{lora_dir}: no LoRA weights; run `dvc repro lora@{cfg.lora.rank}`")
    if not (paths.controlnet / "config.json").is_file():
        raise ControlNetLoadError(
            f"{paths.controlnet}: no ControlNet folder; run `dvc repro controlnet_train`"
        )
    pipe = load_pipeline(paths.dreambooth, torch_dtype=dtype)
    net = ControlNetModel.from_pretrained(
        paths.controlnet, torch_dtype=pipe.unet.dtype, local_files_only=True
    )
    check_compatible(net, pipe.unet, str(paths.controlnet))
    cn_pipe = prepare_for_sampling(control_pipeline(pipe, net).to(device), cfg.compute)  # shares pipe's UNet
    i = cfg.infer
    control = dict(controlnet_conditioning_scale=s.conditioning_scale, control_guidance_end=s.guidance_end)
    control.update(control_guidance_start=s.guidance_start)

    def run(p, image: list[Image.Image] | None = None, **control_kwargs) -> list[Image.Image]:
        jobs = [
            Job(s.prompt, i.seed + k, k, inputs={} if image is None else {"image": image[k]})
            for k in range(len(controls))
        ]
        done = sample(
            p,
            jobs,
            height=i.height,
            width=i.width,
            num_inference_steps=i.num_inference_steps,
            guidance_scale=i.guidance_scale,
            negative_prompt=i.negative_prompt,
            batch_size=i.batch_size,
            batch_size_key="infer.batch_size",
            call_kwargs=control_kwargs,
            desc="controlnet",
        )
        return [done[k].image for k in range(len(controls))]

    out = {"dreambooth": run(cn_pipe, image=controls, **control), "without_controlnet": run(pipe)}
    cn_pipe.load_lora_weights(lora_dir)  # into the shared UNet
    out["lora"] = run(cn_pipe, image=controls, **control)
    return out


def score(controls: list[Image.Image], images: list[Image.Image], s: ControlNetConfig) -> list[EdgeScore]:
    """Edge agreement of each generated image with its control map."""
    return [
        edge_score(
            np.asarray(c)[..., 0] > 0,
            canny_edges(im, s.low_threshold, s.high_threshold),
            tolerance_pixels(c.height, c.width, s.edge_tolerance),
        )
        for c, im in zip(controls, images, strict=True)
    ]


def summarise(
    scores: dict[str, list[EdgeScore]], width: int, height: int, s: ControlNetConfig
) -> dict[str, float]:
    metrics: dict[str, float] = {}
    for variant, items in scores.items():
        for key in ("f1", "precision", "recall"):
            metrics[f"edge_{key}_{variant}"] = float(np.mean([getattr(x, key) for x in items]))
    metrics["edge_f1_gain"] = metrics["edge_f1_dreambooth"] - metrics["edge_f1_without_controlnet"]
    metrics["edge_f1_gain_lora"] = metrics["edge_f1_lora"] - metrics["edge_f1_without_controlnet"]
    metrics["num_control_images"] = float(len(scores["dreambooth"]))
    metrics["edge_tolerance_px"] = float(tolerance_pixels(height, width, s.edge_tolerance))
    return metrics


def run(cfg: PipelineConfig, paths: ControlPaths) -> dict[str, float]:
    """Generate, score and write the grids, ``per_image.json`` and ``metrics.json`` under ``paths.reports``."""
    s = cfg.controlnet
    i = cfg.infer
    params = {
        **{k: v for k, v in to_flat_dict(s, "controlnet.").items() if not k.startswith("controlnet.train.")},
        **{
            f"infer.{k}": getattr(i, k)
            for k in ("height", "width", "num_inference_steps", "guidance_scale", "seed")
        },
        "lora.rank": cfg.lora.rank,
    }
    with stage_run("controlnet", cfg.tracking, params, paths.reports) as tracker:
        annotator = get_annotator(s.annotator, s.low_threshold, s.high_threshold)
        sources = control_sources(s, paths.prepared, i.width, i.height)
        move = Transform(**asdict(s.map_transform))
        controls = [transform_map_image(annotator(im), move) for _, im in sources]
        images = generate(cfg, s, paths, controls)
        scores = {v: score(controls, images[v], s) for v in VARIANTS}
        labels = ["control map", "DreamBooth", f"+ LoRA r{cfg.lora.rank}", "no ControlNet"]
        rows = []
        with atomic_dir(paths.reports / "grids") as tmp:
            for k, (name, _) in enumerate(sources):
                cells = [
                    controls[k],
                    images["dreambooth"][k],
                    images["lora"][k],
                    images["without_controlnet"][k],
                ]
                grid = make_grid(cells, columns=4, labels=labels, cell=max(MIN_CELL, i.width))
                save_image(grid, tmp / f"{k:02d}-{name}.png")
                tracker.log_image(grid, f"controlnet/{k:02d}-{name}.png")
                rows += cells
        overview = make_grid(rows, columns=4, labels=labels * len(sources), cell=max(MIN_CELL, i.width))
        save_image(overview, paths.reports / "overview.png")
        tracker.log_image(overview, "controlnet/overview.png")
        per_image = [
            {"control": name, **{v: asdict(scores[v][k]) for v in VARIANTS}}
            for k, (name, _) in enumerate(sources)
        ]
        (paths.reports / "per_image.json").write_text(json.dumps(per_image, indent=2) + "\n")
        tracker.log_artifact(paths.reports / "per_image.json")
        metrics = summarise(scores, i.width, i.height, s)
        tracker.set_final_metrics(metrics)
    return metrics


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dreambooth", type=Path, default=Path("models/dreambooth"))
    parser.add_argument("--lora-root", type=Path, default=Path("models/lora"))
    parser.add_argument("--controlnet", type=Path, default=Path("models/controlnet"))
    parser.add_argument("--prepared", type=Path, default=Path("data/prepared"))
    parser.add_argument("--reports", type=Path, default=Path("reports/controlnet"))


def _run(cfg: PipelineConfig, a: argparse.Namespace) -> dict[str, float]:
    return run(cfg, ControlPaths(a.dreambooth, a.lora_root, a.controlnet, a.prepared, a.reports))


def main(argv: list[str] | None = None) -> int:
    return stage_main(__doc__ or "", _add_arguments, _run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
