"""Stage `infer`: the inference function for every variant -- base, DreamBooth, each LoRA rank, extracted LoRA.

Images go to ``<out>/<variant>/<prompt-slug>/<i:02d>.png`` (plus each variant's latents), listed in
``<out>/index.json``; grids per variant (rows: prompts) and per prompt (columns: variants) go to
``<reports>/grids/`` and MLflow. LoRA adapters load onto the DreamBooth pipeline through diffusers' public API
(one adapter name per rank, unloaded after use); the LoRA extracted by `convert` loads onto the base pipeline and is
skipped with a note when it does not exist.
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline

from stages.lib.config.loader import to_flat_dict
from stages.lib.config.schema import PipelineConfig
from stages.lib.errors import StageError
from stages.lib.layout import LORA_WEIGHT_NAME, featured_lora_dir, lora_dir
from stages.lib.models.loading import load_pipeline, resolve_device
from stages.lib.runtime.cli import stage_main
from stages.lib.runtime.outputs import atomic_dir
from stages.lib.runtime.timings import phase
from stages.lib.sampling.inference import (
    Generation,
    InferIndex,
    generate,
    prompt_slugs,
    sampling_kwargs,
)
from stages.lib.sampling.sampler import ImageWriter, prepare_for_sampling
from stages.lib.tracking.tracker import StageTracker, stage_run

log = logging.getLogger(__name__)
VARIANT_KINDS = ("base", "dreambooth", "lora", "lora_extracted")
GRID_WRITERS = 4  # threads encoding the report grids


@dataclass(frozen=True)
class InferPaths:
    """Inputs and outputs of the stage (all given by dvc.yaml)."""

    base: Path
    dreambooth: Path
    lora_root: Path
    extracted: Path | None
    out: Path
    reports: Path


@dataclass(frozen=True)
class Variant:
    """One model to sample: a pipeline folder plus, optionally, a LoRA folder loaded onto it."""

    name: str
    pipeline: Path
    lora: Path | None = None
    rank: int | None = None


def lora_variants(cfg: PipelineConfig, paths: InferPaths) -> list[Variant]:
    """Every trained rank (``infer.all_ranks``) or only the featured ``lora.rank``, on the DreamBooth model."""
    featured_lora_dir(cfg.lora, paths.lora_root)  # a clear error when lora.rank is not trained
    ranks = list(cfg.lora.ranks) if cfg.infer.all_ranks else [cfg.lora.rank]
    missing = [
        f"r{r} (dvc repro lora@{r})"
        for r in ranks
        if not (lora_dir(paths.lora_root, r) / LORA_WEIGHT_NAME).is_file()
    ]
    if missing:
        raise StageError(f"{paths.lora_root}: LoRA weights missing, train them first: {', '.join(missing)}")
    return [Variant(f"lora_r{r}", paths.dreambooth, lora_dir(paths.lora_root, r), r) for r in ranks]


def plan_variants(cfg: PipelineConfig, paths: InferPaths) -> tuple[list[Variant], dict[str, str]]:
    """The variants of ``infer.variants`` in order, and those skipped with the reason."""
    unknown = [v for v in cfg.infer.variants if v not in VARIANT_KINDS]
    if unknown:
        raise StageError(f"infer.variants: unknown {unknown}; choose from {list(VARIANT_KINDS)}")
    planned: list[Variant] = []
    skipped: dict[str, str] = {}
    for kind in cfg.infer.variants:
        if kind in ("base", "dreambooth"):
            planned.append(Variant(kind, paths.base if kind == "base" else paths.dreambooth))
        elif kind == "lora":
            planned += lora_variants(cfg, paths)
        elif paths.extracted is not None and (paths.extracted / LORA_WEIGHT_NAME).is_file():
            planned.append(Variant(kind, paths.base, paths.extracted))
        else:
            where = (
                f"no {LORA_WEIGHT_NAME} in {paths.extracted}"
                if paths.extracted
                else "no --lora-extracted given"
            )
            skipped[kind] = f"{where} (convert.extract_rank=0 or the convert stage has not run)"
            log.info("skipping variant %s: %s", kind, skipped[kind])
    return planned, skipped


def _sample(
    pipe: StableDiffusionPipeline, variant: Variant, cfg: PipelineConfig, out_dir: Path
) -> Generation:
    """Generate one variant, loading its LoRA under its own adapter name and unloading it afterwards."""
    if variant.lora is None:
        return _sample_prompts(pipe, variant, cfg, out_dir)
    with phase("adapters"):
        pipe.load_lora_weights(variant.lora, weight_name=LORA_WEIGHT_NAME, adapter_name=variant.name)
    try:
        return _sample_prompts(pipe, variant, cfg, out_dir)
    finally:
        with phase("adapters"):
            pipe.unload_lora_weights()


def _sample_prompts(
    pipe: StableDiffusionPipeline, variant: Variant, cfg: PipelineConfig, out_dir: Path
) -> Generation:
    """The prompt list and ``infer.class_prompt_images`` images of the class prompt (in ``class_files``), sampled
    together: one queue, so the class images fill the prompt list's batches instead of a call of their own."""
    return generate(
        pipe,
        cfg.infer.prompts,
        **sampling_kwargs(cfg.infer),
        out_dir=out_dir,
        variant=variant.name,
        class_probe=(cfg.data.class_prompt, cfg.infer.class_prompt_images),
    )


def generate_variants(cfg: PipelineConfig, variants: list[Variant], out_dir: Path) -> dict[str, Generation]:
    """Load each pipeline once (fp16 on CUDA, with ``compute``'s sampling levers) and sample its variants;
    results in ``variants`` order."""
    device = resolve_device(cfg.compute)
    dtype = torch.float16 if device.type == "cuda" else None
    results: dict[str, Generation] = {}
    for folder in dict.fromkeys(v.pipeline for v in variants):
        pipe = prepare_for_sampling(load_pipeline(folder, torch_dtype=dtype).to(device), cfg.compute)
        for variant in (v for v in variants if v.pipeline == folder):
            results[variant.name] = _sample(pipe, variant, cfg, out_dir)
        del pipe
    return {v.name: results[v.name] for v in variants}


def log_grids(index: InferIndex, reports: Path, tracker: StageTracker) -> None:
    """One grid per variant (rows: prompts) and one per prompt (columns: variants)."""
    grids = {f"variant_{v}": index.variant_grid(v) for v in index.variants}
    slugs = prompt_slugs(index.prompts)
    grids |= {
        f"prompt_{s}": index.grid(list(index.variants), [p])
        for p, s in zip(index.prompts, slugs, strict=True)
    }
    # large PNGs, encoded side by side (Pillow's encoder releases the GIL)
    with ImageWriter(workers=GRID_WRITERS) as writer:
        for name, grid in grids.items():
            writer.submit(grid, reports / "grids" / f"{name}.png")
            tracker.log_image(grid, f"grids/{name}.png")


def run(cfg: PipelineConfig, paths: InferPaths) -> dict[str, float]:
    """Sample every planned variant into ``paths.out`` (replaced atomically) and log the grids."""
    variants, skipped = plan_variants(cfg, paths)
    if not variants:
        raise StageError(f"infer.variants={list(cfg.infer.variants)}: nothing to generate ({skipped})")
    params = {
        **to_flat_dict(cfg.infer, "infer."),
        "lora.ranks": list(cfg.lora.ranks),
        "variants": [v.name for v in variants],
    }
    with stage_run("infer", cfg.tracking, params, paths.reports) as tracker:
        start = time.perf_counter()
        ranks = {v.name: v.rank for v in variants if v.rank is not None}
        with atomic_dir(paths.out) as tmp:
            results = generate_variants(cfg, variants, tmp)
            probed = any(gen.class_files for gen in results.values())
            InferIndex.from_results(
                tmp,
                results,
                settings=sampling_kwargs(cfg.infer),
                lora_ranks=ranks,
                skipped=skipped,
                class_prompt=cfg.data.class_prompt if probed else "",
            ).write()
        seconds = time.perf_counter() - start
        with phase("report"):
            log_grids(InferIndex.load(paths.out), paths.reports, tracker)
        num_images = sum(len(ims) for gen in results.values() for ims in gen.images.values())
        metrics = {
            "num_variants": float(len(results)),
            "num_images": float(num_images),
            "seconds": seconds,
            "images_per_s": num_images / seconds,
        }
        tracker.set_final_metrics(metrics)
    return metrics


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", type=Path, default=Path("models/base"))
    parser.add_argument("--dreambooth", type=Path, default=Path("models/dreambooth"))
    parser.add_argument("--lora-root", type=Path, default=Path("models/lora"))
    parser.add_argument(
        "--lora-extracted", type=Path, default=None, help="optional: convert's extracted LoRA"
    )
    parser.add_argument("--out", type=Path, default=Path("data/infer"))
    parser.add_argument("--reports", type=Path, default=Path("reports/infer"))


def _run(cfg: PipelineConfig, a: argparse.Namespace) -> dict[str, float]:
    return run(cfg, InferPaths(a.base, a.dreambooth, a.lora_root, a.lora_extracted, a.out, a.reports))


def main(argv: list[str] | None = None) -> int:
    return stage_main(__doc__ or "", _add_arguments, _run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
