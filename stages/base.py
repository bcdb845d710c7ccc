"""Stage `base`: build and pretrain (tiny default) or load (real SD1.5) the base pipeline; save it in diffusers format.

The tiny default is pretrained on the miniature world of faces (stages/lib/miniature/world.py) through the shared training
loop (resumable from ``--checkpoints``), and its attribute reader is saved in ``<out>/attribute_reader``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from stages.lib.config.loader import to_flat_dict
from stages.lib.config.schema import ModelConfig, PipelineConfig
from stages.lib.layout import SOURCE_FILE
from stages.lib.miniature.pretrain import pretrain_tiny
from stages.lib.models.base_source import load_base_source
from stages.lib.models.loading import load_pipeline, resolve_device
from stages.lib.runtime.cli import stage_main
from stages.lib.runtime.hashing import file_sha256
from stages.lib.runtime.outputs import atomic_dir
from stages.lib.tracking.tracker import stage_run
from stages.lib.training.finetune import write_loss_table


def describe_source(cfg: ModelConfig) -> dict[str, str]:
    """Provenance written beside the weights; exports copy it into their metadata."""
    info = {"source": cfg.source, "path": cfg.path, "revision": cfg.revision}
    if cfg.source == "single_file":
        info["sha256"] = file_sha256(Path(cfg.path))
    return info


def run(
    cfg: PipelineConfig, out_dir: Path, reports_dir: Path, checkpoint_dir: Path = Path("checkpoints/base")
) -> dict[str, float]:
    """Save the configured base model to ``out_dir``; returns its parameter counts (and pretraining metrics)."""
    params = to_flat_dict(cfg.model, "model.")
    with stage_run("base", cfg.tracking, params, reports_dir) as tracker:
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as work, atomic_dir(out_dir) as tmp:
            pipe = load_base_source(cfg.model, Path(work))
            pretrained = {}
            if cfg.model.source == "tiny":
                pipe.to(resolve_device(cfg.compute))
                pretrained = pretrain_tiny(pipe, cfg.model.tiny, tmp, checkpoint_dir, reports_dir, tracker)
                pipe.to("cpu")
            if "pretrain_steps" not in pretrained:  # loss.csv is a DVC plot of the stage: always written
                write_loss_table([], reports_dir / "loss.csv")
            pipe.save_pretrained(tmp, safe_serialization=True)
            (tmp / SOURCE_FILE).write_text(json.dumps(describe_source(cfg.model), indent=2) + "\n")
            load_pipeline(tmp)  # what downstream stages will do: fail here, not three stages later
        metrics = {
            f"{name}_params_M": sum(p.numel() for p in getattr(pipe, name).parameters()) / 1e6
            for name in ("unet", "vae", "text_encoder")
        }
        metrics |= pretrained
        metrics["seconds"] = time.perf_counter() - start
        tracker.set_final_metrics(metrics)
    return metrics


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("models/base"))
    parser.add_argument("--reports", type=Path, default=Path("reports/base"))
    parser.add_argument(
        "--checkpoints", type=Path, default=Path("checkpoints/base"), help="pretraining (tiny)"
    )


def main(argv: list[str] | None = None) -> int:
    return stage_main(
        __doc__ or "", _add_arguments, lambda cfg, a: run(cfg, a.out, a.reports, a.checkpoints), argv
    )


if __name__ == "__main__":
    raise SystemExit(main())
