"""DreamBooth sweep on the miniature world: subject rate, prompt fidelity and class drift of DreamBooth trained
with config overrides, read off many more images than `dvc repro`'s compare report makes, beside the base model
measured in the same run.

Each variant is a name and Hydra overrides of the project's conf/ (what `dvc exp run -S` takes). The stages
upstream of DreamBooth run again for a variant only where its overrides change them: the sample subject and prep
(``sample_subject.*``, ``prep.*``, ``data.*``), the class images (``class_images.*``); otherwise the variant
trains on the outputs of an earlier `dvc repro`. DreamBooth is trained by the stage's own code
(``stages.dreambooth.run``, MLflow off), sampled by `infer`'s code and scored with `compare`'s metrics, like
benchmarks/lora_rank_sweep.py. Variants run in ``--jobs`` processes at once.

    python -m benchmarks.dreambooth_sweep --variant profile --variant uncaptioned sample_subject.captions=false \\
        --variant lr4e-4 dreambooth.learning_rate=4e-4 --images-per-prompt 40 --jobs 2 --out db.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from benchmarks.lora_rank_sweep import print_row, score
from stages import class_images, dreambooth, prep, sample_subject
from stages.compose import compose
from stages.infer import Variant
from stages.lib.config.loader import load_config
from stages.lib.config.schema import PipelineConfig
from stages.lib.imaging.manifest import MANIFEST, Manifest
from stages.lib.miniature.attribute_reader import READER_DIR, load_reader
from stages.lib.training.finetune import FinetunePaths

SAMPLE_SUBJECT_DIR = "data/sample_subject"  # data.instance_dir of the embedded default


@dataclass(frozen=True)
class SweepInputs:
    """What every variant starts from: the project and its composed config, an earlier `dvc repro`'s outputs, and
    the image counts."""

    root: Path
    workspace: PipelineConfig  # conf/ as it is: what the earlier outputs were made with
    base: Path
    prepared: Path
    class_images: Path
    images_per_prompt: int
    class_images_per_variant: int
    threads: int


def parse_variants(specs: list[list[str]]) -> dict[str, list[str]]:
    """``--variant NAME [KEY=VALUE ...]`` occurrences as {name: overrides}; names must be unique and not "base"
    (the base model's row)."""
    variants: dict[str, list[str]] = {}
    for name, *overrides in specs:
        if name in variants or name == "base" or "=" in name:
            raise SystemExit(
                f"--variant {name}: give each variant a unique name other than 'base' first, then its overrides"
            )
        variants[name] = overrides
    return variants


def photos_for(cfg: PipelineConfig, inputs: SweepInputs, work: Path) -> Path:
    """The prepared photos the variant trains on: the workspace's, or made again where its overrides change them."""
    workspace = inputs.workspace
    if (cfg.sample_subject, cfg.data, cfg.prep) == (workspace.sample_subject, workspace.data, workspace.prep):
        return inputs.prepared
    photos = Path(cfg.data.instance_dir)
    if cfg.data.instance_dir == SAMPLE_SUBJECT_DIR:
        photos = work / "sample_subject"
        sample_subject.run(cfg, photos)
    elif not photos.is_absolute():
        photos = inputs.root / photos
    prep.run(cfg, photos, work / "prepared", work / "prep_reports")
    return work / "prepared"


def class_images_for(cfg: PipelineConfig, inputs: SweepInputs, work: Path) -> Path:
    """The class images: the workspace's, or made again where the variant changes their settings."""
    workspace = inputs.workspace
    if cfg.class_images == workspace.class_images and cfg.data.class_prompt == workspace.data.class_prompt:
        return inputs.class_images
    class_images.run(cfg, inputs.base, work / "class_images", work / "class_reports")
    return work / "class_images"


def run_variant(name: str, overrides: list[str], inputs: SweepInputs, work_root: str) -> dict[str, object]:
    """Train and score one variant in this (worker) process; returns its row."""
    torch.set_num_threads(inputs.threads)
    work = Path(work_root) / name
    work.mkdir(parents=True)
    cfg = load_config(compose(work / "params.yaml", overrides, root=inputs.root))
    cfg = replace(
        cfg,
        tracking=replace(cfg.tracking, enabled=False),
        infer=replace(
            cfg.infer,
            num_images_per_prompt=inputs.images_per_prompt,
            class_prompt_images=inputs.class_images_per_variant,
        ),
    )
    reader, info = load_reader(inputs.base / READER_DIR)  # checked by main
    row: dict[str, object] = {"variant": name, "overrides": overrides}
    if name == "base":
        return row | {"train_s": 0.0} | score(cfg, Variant(name, inputs.base), work, reader, info["subject"])
    prepared = photos_for(cfg, inputs, work)
    classes = class_images_for(cfg, inputs, work)
    train = replace(cfg.dreambooth, validation_steps=cfg.dreambooth.max_train_steps + 1)
    paths = FinetunePaths(prepared, classes, work / "checkpoints", work / "reports")
    start = time.perf_counter()
    metrics = dreambooth.run(replace(cfg, dreambooth=train), inputs.base, work / "model", paths)
    row["train_s"] = time.perf_counter() - start
    row["captioned_photos"] = sum(bool(e.caption) for e in Manifest.read(prepared / MANIFEST).images)
    row["class_images"] = len(list(classes.glob("*.png")))
    row["final_loss"] = metrics.get("final_loss", float("nan"))
    return row | score(cfg, Variant(name, work / "model"), work, reader, info["subject"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--root", type=Path, default=Path("."), help="the project (its conf/ is composed)")
    parser.add_argument("--base", type=Path, default=Path("models/base"))
    parser.add_argument("--prepared", type=Path, default=Path("data/prepared"))
    parser.add_argument("--class-images", type=Path, default=Path("data/class_images"))
    parser.add_argument(
        "--variant",
        nargs="+",
        action="append",
        required=True,
        metavar=("NAME", "KEY=VALUE"),
        help="a variant: its name, then Hydra overrides (none: the profile as it is)",
    )
    parser.add_argument("--images-per-prompt", type=int, default=40)
    parser.add_argument("--class-images-per-variant", type=int, default=32)
    parser.add_argument("--jobs", type=int, default=1, help="variants trained at once, one process each")
    parser.add_argument("--out", type=Path, default=None, help="write the rows as JSON")
    args = parser.parse_args(argv)
    variants = {"base": [], **parse_variants(args.variant)}
    if load_reader(args.base / READER_DIR) is None:
        parser.error(
            f"{args.base / READER_DIR}: no attribute reader (run `dvc repro base` on the tiny profile)"
        )
    root = args.root.resolve()
    with tempfile.TemporaryDirectory() as tmp:
        workspace = load_config(compose(Path(tmp) / "params.yaml", [], root=root))
    inputs = SweepInputs(
        root,
        workspace,
        args.base.resolve(),
        args.prepared.resolve(),
        args.class_images.resolve(),
        args.images_per_prompt,
        args.class_images_per_variant,
        threads=max(1, torch.get_num_threads() // max(1, args.jobs)),
    )
    rows = []
    with (
        tempfile.TemporaryDirectory() as work,
        ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool,
    ):
        futures = [pool.submit(run_variant, n, o, inputs, work) for n, o in variants.items()]
        for future in futures:
            rows.append(future.result())
            print_row(rows[-1], header=len(rows) == 1, with_params=False)
            if args.out:
                args.out.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
