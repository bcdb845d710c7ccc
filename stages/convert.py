"""Stage `convert`: exports of the trained weights for tools outside diffusers, each reloaded and checked.

Per LoRA rank the seed's ``pytorch_lora_weights.bin`` and a kohya-format ``.safetensors`` (A1111 / ComfyUI)
with training metadata; the DreamBooth model as one original-layout single file; a LoRA extracted from the
DreamBooth UNet delta; DreamBooth + the featured LoRA fused into one single file.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

from stages.lib.config.loader import to_flat_dict
from stages.lib.config.schema import PipelineConfig
from stages.lib.errors import StageError
from stages.lib.layout import LORA_WEIGHT_NAME, SOURCE_FILE, featured_lora_dir, lora_dir
from stages.lib.models import export_checks as check
from stages.lib.models import lora_formats as fmt
from stages.lib.models.loading import load_pipeline, resolve_device
from stages.lib.models.lora_extract import extract_lora, save_extracted
from stages.lib.models.single_file import load_single_file, save_single_file
from stages.lib.runtime.cli import stage_main
from stages.lib.runtime.hashing import file_sha256
from stages.lib.runtime.outputs import atomic_dir
from stages.lib.runtime.timings import phase
from stages.lib.tracking.tracker import git_commit, stage_run

log = logging.getLogger(__name__)

SINGLE_FILE = "dreambooth.safetensors"
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
CHECKPOINT_SPEC = ("stable-diffusion-v1", "https://github.com/Stability-AI/generative-models")


def lora_sources(cfg: PipelineConfig, lora_root: Path) -> dict[int, Path]:
    """Each trained rank's diffusers LoRA file (``lora.rank`` must be one of them)."""
    featured_lora_dir(cfg.lora, lora_root)
    sources = {rank: lora_dir(lora_root, rank) / LORA_WEIGHT_NAME for rank in cfg.lora.ranks}
    missing = [f"{path} (dvc repro lora@{rank})" for rank, path in sources.items() if not path.is_file()]
    if missing:
        raise StageError(f"LoRA weights missing, train them first: {', '.join(missing)}")
    return sources


def file_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise StageError(f"convert.single_file_dtype='{name}' is not one of {', '.join(DTYPES)}")
    return DTYPES[name]


def base_info(base_dir: Path) -> dict[str, str]:
    """Name and sha256 of the base model: source.json's file hash, else the hash of the saved UNet weights."""
    info = json.loads((base_dir / SOURCE_FILE).read_text()) if (base_dir / SOURCE_FILE).is_file() else {}
    weights = base_dir / "unet" / "diffusion_pytorch_model.safetensors"
    if not info.get("sha256") and not weights.is_file():
        raise StageError(
            f"{weights}: not found, and {base_dir / SOURCE_FILE} names no sha256 of the base model"
        )
    path, source = info.get("path", ""), info.get("source", "")
    name = Path(path).name if source in ("single_file", "folder") else path or source or base_dir.name
    return {
        "name": name,
        "sha256": info.get("sha256") or file_sha256(weights),
        "revision": info.get("revision", ""),
    }


def verified(prefix: str, diff: float, output: float, path: Path) -> dict[str, float]:
    """What every reloaded export reports: tensor and UNet-output differences from its source, file size."""
    return {
        f"{prefix}_max_abs_diff": diff,
        f"{prefix}_output_diff": output,
        f"{prefix}_mb": check.megabytes(path),
    }


@dataclass
class Exporter:
    """What every export shares: the config, the DreamBooth pipeline and the header keys of the provenance."""

    cfg: PipelineConfig
    pipe: StableDiffusionPipeline  # the DreamBooth model; merged() fuses a LoRA into it
    config_dir: Path  # from_single_file's configs: the DreamBooth folder has every one of them
    base: dict[str, str]  # name, sha256, revision of the base model
    meta: dict[str, str] = field(init=False)  # project keys written into every header

    def __post_init__(self) -> None:
        self.meta = fmt.project_metadata(self.cfg.data, self.base, git_commit())

    def lora(self, rank: int, source: Path, folder: Path) -> dict[str, float]:
        """The enabled LoRA exports of one rank, each reloaded by diffusers and probed against the source."""
        state, out = load_file(source), {}
        with check.lora_loaded(self.pipe, source):
            reference = check.unet_probe(self.pipe.unet)
        if self.cfg.convert.bin:  # the seed's conversion
            path = folder / fmt.BIN_WEIGHT
            out |= self.reloaded(f"bin_r{rank}", fmt.save_bin(state, path), path, reference)
        if self.cfg.convert.kohya:
            path, diff = self.kohya(rank, source, state, folder)
            out |= self.reloaded(f"kohya_r{rank}", diff, path, reference)
        return out

    def kohya(
        self, rank: int, source: Path, state: dict[str, torch.Tensor], folder: Path
    ) -> tuple[Path, float]:
        """The kohya / A1111 / ComfyUI file with ``ss_*`` metadata, and its exact round-trip difference."""
        cfg = self.cfg
        name, alpha = f"{cfg.data.instance_token}_r{rank}", fmt.trained_alpha(source, cfg.lora.alpha or rank)
        meta = fmt.kohya_metadata(
            name, rank, alpha, cfg.lora.train, cfg.lora.train.max_train_steps, self.base
        )
        path = folder / f"{name}_kohya.safetensors"
        return path, fmt.save_kohya(state, alpha, path, {**meta, **self.meta})

    def reloaded(self, prefix: str, diff: float, path: Path, reference: torch.Tensor) -> dict[str, float]:
        """A LoRA file loaded by plain diffusers (.bin: folder + ``weight_name``; kohya: detected)."""
        source, kwargs = (path.parent, {"weight_name": path.name}) if path.suffix == ".bin" else (path, {})
        with check.lora_loaded(self.pipe, source, **kwargs):
            return verified(prefix, diff, check.output_diff(self.pipe.unet, reference), path)

    def single_file(
        self, path: Path, title: str, prefix: str, reference: torch.Tensor | None = None
    ) -> dict[str, float]:
        """Save the pipeline as one SD1.x file, reload it by from_single_file, compare weights and outputs."""
        cfg, pipe = self.cfg, self.pipe
        dtype = file_dtype(cfg.convert.single_file_dtype)
        spec = fmt.modelspec(*CHECKPOINT_SPEC, title, cfg.dreambooth.resolution)
        save_single_file(pipe, path, {**spec, **self.meta}, dtype)
        loaded = load_single_file(path, torch_dtype=torch.float32, config_dir=self.config_dir)
        reference = check.unet_probe(pipe.unet) if reference is None else reference
        diff = check.weights_diff(pipe, loaded, dtype, path)
        return verified(prefix, diff, check.output_diff(loaded.unet, reference), path)

    def extracted(self, base_dir: Path, folder: Path) -> dict[str, float]:
        """LoRA of the DreamBooth UNet delta; how far it moves the base model's output to DreamBooth's."""
        base = load_pipeline(base_dir)
        targets, rank = self.cfg.lora.target_modules, self.cfg.convert.extract_rank
        extraction = extract_lora(base.unet, self.pipe.unet, targets, rank, resolve_device(self.cfg.compute))
        path = save_extracted(extraction, folder)
        target, before = check.unet_probe(self.pipe.unet), check.unet_probe(base.unet)
        with check.lora_loaded(base, folder):
            after = check.unet_probe(base.unet)
        text_moved = check.text_encoder_changed(base.text_encoder, self.pipe.text_encoder)
        if text_moved:
            log.warning(
                "convert: DreamBooth trained the text encoder (dreambooth.train_text_encoder); the extracted LoRA "
                "holds the UNet delta only, so on the base model it carries only part of the subject"
            )
        return {
            "extract_text_encoder_left_out": float(text_moved),
            "extract_rel_error": extraction.relative_error,
            "extract_rel_error_max": max(extraction.errors.values()),
            "extract_output_ratio": check.moved_towards(before, after, target),
            "extract_mb": check.megabytes(path),
        }

    def merged(self, source: Path, path: Path) -> dict[str, float]:
        """Fuse the featured LoRA into the pipeline (for good) and export it as one file; compared with the
        unfused DreamBooth + LoRA output."""
        self.pipe.load_lora_weights(str(source))
        reference = check.unet_probe(self.pipe.unet)
        self.pipe.fuse_lora()
        self.pipe.unload_lora_weights()
        title = f"{self.cfg.data.instance_token} DreamBooth + LoRA r{self.cfg.lora.rank}"
        return self.single_file(path, title, "merged", reference)


def run(
    cfg: PipelineConfig,
    base_dir: Path,
    dreambooth_dir: Path,
    lora_root: Path,
    out_dir: Path,
    reports_dir: Path,
) -> dict[str, float]:
    """Write every enabled export to ``out_dir`` (atomically: a failure keeps the previous export)."""
    conv = cfg.convert
    file_dtype(conv.single_file_dtype)
    sources = lora_sources(cfg, lora_root) if conv.bin or conv.kohya or conv.merged else {}
    base = base_info(base_dir)
    params = {**to_flat_dict(conv, "convert."), "lora.ranks": ",".join(map(str, cfg.lora.ranks))}
    with stage_run("convert", cfg.tracking, {**params, "lora.rank": cfg.lora.rank}, reports_dir) as tracker:
        with atomic_dir(out_dir) as tmp:
            ex = Exporter(cfg, load_pipeline(dreambooth_dir), dreambooth_dir, base)
            metrics: dict[str, float] = {}
            if conv.single_file:
                with phase("single_file"):
                    metrics |= ex.single_file(
                        tmp / SINGLE_FILE, f"{cfg.data.instance_token} DreamBooth", "single_file"
                    )
            if conv.bin or conv.kohya:
                with phase("lora_exports"):
                    for rank, source in sources.items():
                        metrics |= ex.lora(rank, source, lora_dir(tmp / "lora", rank))
            (tmp / "lora_extracted").mkdir()  # always there: infer depends on it (empty when extract_rank=0)
            if conv.extract_rank:
                with phase("extract"):
                    metrics |= ex.extracted(base_dir, lora_dir(tmp / "lora_extracted", conv.extract_rank))
            if conv.merged:  # last: fusing modifies the DreamBooth pipeline
                with phase("merged"):
                    metrics |= ex.merged(sources[cfg.lora.rank], tmp / f"merged_r{cfg.lora.rank}.safetensors")
        tracker.set_final_metrics(metrics)
    return metrics


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", type=Path, default=Path("models/base"))
    parser.add_argument("--dreambooth", type=Path, default=Path("models/dreambooth"))
    parser.add_argument("--lora-root", type=Path, default=Path("models/lora"))
    parser.add_argument("--out", type=Path, default=Path("models/export"))
    parser.add_argument("--reports", type=Path, default=Path("reports/convert"))


def _run(cfg: PipelineConfig, a: argparse.Namespace) -> dict[str, float]:
    return run(cfg, a.base, a.dreambooth, a.lora_root, a.out, a.reports)


def main(argv: list[str] | None = None) -> int:
    return stage_main(__doc__ or "", _add_arguments, _run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
