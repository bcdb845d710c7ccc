"""LoRA rank sweep on the miniature world: subject rate, prompt fidelity and class drift per (learning rate, steps,
rank), read off many more images than `dvc repro`'s compare report makes, with the DreamBooth model they are
trained on measured in the same run as the baseline.

Each adapter is trained by the `lora` stage's own code (``stages.lora.run``, MLflow off) on the outputs of an
earlier `dvc repro` (base, DreamBooth, prepared photos, class images) and sampled by `infer`'s code; the numbers are
`compare`'s (``stages.compare.world_scores``). Differences below about two ``subject_rate_stderr`` are noise.

    python benchmarks/lora_rank_sweep.py --lrs 1e-3 1e-2 --steps 100 300 --images-per-prompt 40 --out sweep.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

from safetensors import safe_open

from stages import lora as lora_stage
from stages.compare import world_scores
from stages.infer import Variant, generate_variants
from stages.lib.config.loader import load_config
from stages.lib.config.schema import PipelineConfig
from stages.lib.layout import LORA_WEIGHT_NAME
from stages.lib.miniature.attribute_reader import READER_DIR, load_reader
from stages.lib.miniature.world_metrics import DESCRIPTIONS as WORLD_METRICS
from stages.lib.sampling.inference import InferIndex
from stages.lib.training.finetune import FinetunePaths

COLUMNS = tuple(WORLD_METRICS)  # compare's miniature-world metrics, in their order


@dataclass(frozen=True)
class SweepSettings:
    """What every adapter of one sweep shares: its LoRA alpha and how many images score it."""

    alpha: float
    images_per_prompt: int
    class_images_per_variant: int


def sweep_config(
    cfg: PipelineConfig, rank: int, lr: float, steps: int, sweep: SweepSettings
) -> PipelineConfig:
    """The pipeline config with one rank trained at ``lr`` for ``steps``, MLflow off, and the sweep's image counts."""
    train = replace(cfg.lora.train, learning_rate=lr, max_train_steps=steps, validation_steps=steps + 1)
    return replace(
        cfg,
        lora=replace(cfg.lora, ranks=[rank], rank=rank, alpha=sweep.alpha, train=train),
        infer=replace(
            cfg.infer,
            num_images_per_prompt=sweep.images_per_prompt,
            class_prompt_images=sweep.class_images_per_variant,
        ),
        tracking=replace(cfg.tracking, enabled=False),
    )


def saved_alpha(lora_dir: Path) -> float:
    """``lora_alpha`` as the saved adapter's metadata records it (what diffusers loads it with)."""
    with safe_open(lora_dir / LORA_WEIGHT_NAME, "pt") as weights:
        metadata = json.loads(weights.metadata()["lora_adapter_metadata"])
    return float(metadata["unet.lora_alpha"])


def score(cfg: PipelineConfig, variant: Variant, work: Path, reader, subject) -> dict[str, float]:
    """Sample one variant with infer's code and read its images with compare's metrics."""
    out = work / "infer" / variant.name
    index = InferIndex.from_results(out, generate_variants(cfg, [variant], out), settings={})
    return world_scores(reader, subject, index, variant.name, cfg.data.instance_token)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--base", type=Path, default=Path("models/base"))
    parser.add_argument("--dreambooth", type=Path, default=Path("models/dreambooth"))
    parser.add_argument("--prepared", type=Path, default=Path("data/prepared"))
    parser.add_argument("--class-images", type=Path, default=Path("data/class_images"))
    parser.add_argument("--ranks", type=int, nargs="+", default=None, help="default: lora.ranks")
    parser.add_argument(
        "--lrs", type=float, nargs="+", default=None, help="default: lora.train.learning_rate"
    )
    parser.add_argument(
        "--steps", type=int, nargs="+", default=None, help="default: lora.train.max_train_steps"
    )
    parser.add_argument("--alpha", type=float, default=None, help="lora.alpha (0: the rank; default: params)")
    parser.add_argument("--images-per-prompt", type=int, default=24)
    parser.add_argument("--class-images-per-variant", type=int, default=32)
    parser.add_argument("--out", type=Path, default=None, help="write the rows as JSON")
    args = parser.parse_args(argv)

    cfg = load_config(args.params)
    sweep = SweepSettings(
        cfg.lora.alpha if args.alpha is None else args.alpha,
        args.images_per_prompt,
        args.class_images_per_variant,
    )
    loaded = load_reader(args.base / READER_DIR)
    if loaded is None:
        parser.error(
            f"{args.base / READER_DIR}: no attribute reader (run `dvc repro base` on the tiny profile)"
        )
    reader, info = loaded
    subject = dict(info["subject"])
    ranks = args.ranks or list(cfg.lora.ranks)
    lrs = args.lrs or [cfg.lora.train.learning_rate]
    steps_list = args.steps or [cfg.lora.train.max_train_steps]

    rows: list[dict[str, float | str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        baseline_cfg = sweep_config(cfg, ranks[0], lrs[0], steps_list[0], sweep)
        db = score(baseline_cfg, Variant("dreambooth", args.dreambooth), work, reader, subject)
        rows.append({"variant": "dreambooth", "lr": 0.0, "steps": 0, "rank": 0, "train_s": 0.0, **db})
        print_row(rows[-1], header=True)
        for lr in lrs:
            for steps in steps_list:
                for rank in ranks:
                    run_cfg = sweep_config(cfg, rank, lr, steps, sweep)
                    name = f"lr{lr:.0e}_s{steps}_r{rank}"  # an adapter name: no dots
                    paths = FinetunePaths(
                        args.prepared, args.class_images, work / "ckpt" / name, work / "reports" / name
                    )
                    start = time.perf_counter()
                    metrics = lora_stage.run(run_cfg, rank, args.dreambooth, work / "lora" / name, paths)
                    seconds = time.perf_counter() - start
                    variant = Variant(name, args.dreambooth, work / "lora" / name, rank)
                    scores = score(run_cfg, variant, work, reader, subject)
                    row = {"variant": name, "lr": lr, "steps": steps, "rank": rank, "train_s": seconds}
                    row |= {"alpha": saved_alpha(work / "lora" / name), "lora_params": metrics["lora_params"]}
                    rows.append(row | scores)
                    print_row(rows[-1])
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


def print_row(row: dict[str, object], header: bool = False, with_params: bool = True) -> None:
    """One line per variant, aligned (``with_params``: the adapter's parameter count after its name)."""
    params_head = f"{'params':>8}" if with_params else ""
    if header:
        print(f"{'variant':<22}{params_head}{'train_s':>8}" + "".join(f"{c[:13]:>14}" for c in COLUMNS))
    params = f"{int(row.get('lora_params', 0)):>8}" if with_params else ""
    print(
        f"{row['variant']:<22}{params}{row['train_s']:>8.1f}"
        + "".join(f"{row.get(c, float('nan')):>14.3f}" for c in COLUMNS),
        flush=True,
    )


if __name__ == "__main__":
    raise SystemExit(main())
