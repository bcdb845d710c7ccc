"""Component benchmark: the project's training steps and samplers against the plain diffusers way, in one process,
interleaved and repeated, with the numerical checks that say the speed changed nothing that is computed.

Plain side (what users compare with):
- DreamBooth step: diffusers' ``train_dreambooth.py`` -- VAE encode and text encoder every step, bf16 autocast over
  fp32 weights, bitsandbytes AdamW8bit, ``clip_grad_norm_``, the loss read back every step (its progress bar);
- LoRA step: ``train_dreambooth_lora.py`` -- the same with the frozen UNet in bf16 and fp32 LoRA weights;
- sampling: ``StableDiffusionPipeline`` in fp16 at its best batch size (searched among ``--plain-batches``).
Project side: ``DiffusionTrainer.train_steps`` with the default ``compute`` levers (one CUDA graph per step, flat
8-bit AdamW, frozen weights in bf16), ``class_images.write_images`` and ``inference.generate`` (PNG writing
included) with their default batch size ``auto``.

Each comparison runs ``--repeats`` rounds of (plain block, project block); the JSON and the table give the median
and min-max of each side's rate and of the per-round ratio. Checks in the same run: the captured step's loss equals
the eager step's on the same batch; after ``--check-steps`` steps its weights agree with the eager AdamW8bit path
(bitsandbytes); the project sampler's images equal the plain pipeline's for the same seeds.

    python -m benchmarks.speed --out benchmarks/results/speed_h200.json        # SD1.5 size on one GPU
    python -m benchmarks.speed --model tiny --device cpu --repeats 2 --steps 2 --check-steps 3 --sample-images 2
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from peft import LoraConfig as PeftLoraConfig

from benchmarks.train_step import CLASS_PROMPT, INSTANCE_PROMPT, RESOLUTION, baseline_step_fn, sd15_pipeline
from stages.lib.config.schema import (
    ComputeConfig,
    PipelineConfig,
    TinyModelConfig,
    TrackingConfig,
    TrainConfig,
)
from stages.lib.miniature.tiny_model import build_tiny_pipeline
from stages.lib.tracking.tracker import StageTracker
from stages.lib.training.checkpoints import CheckpointStore
from stages.lib.training.data import ImageSet, encode_latents
from stages.lib.training.finetune import (
    apply_training_levers,
    enable_gradient_checkpointing,
    encode_prompt,
    prompt_ids,
)
from stages.lib.training.trainer import DiffusionTrainer, TrainingData, accelerator_for

EAGER = ComputeConfig(cuda_graphs=False, flat_optimizer=False, channels_last=False, fuse_qkv=False,
                      half_frozen_weights=False)  # fmt: skip
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
# The checks' tolerances: the fast step's first loss against the eager step's (bf16 rounding); after the check's
# steps, the distance between the fast and the eager (bitsandbytes) weights relative to the eager update, and the
# cosine of the two updates (8-bit state rounding differs between the kernels); images in [0, 1], mean |diff|.
CHECK_FIRST_LOSS_REL = 2e-2
CHECK_WEIGHTS_REL = 0.25
CHECK_UPDATE_COSINE = 0.95
CHECK_IMAGE_MEAN_ABS = 1e-2
INFER_PROMPTS = [
    "a photo of sks man face in a kitchen",
    "anime style portrait of sks man face",
    "classicist art painting of sks man face",
    "a photo of sks man face in a forest",
    "a photo of sks man face in a night city",
]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def summary(values: list[float]) -> dict[str, float]:
    """Median, min and max."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


class Bench:
    """The model, the data and the device shared by every comparison."""

    def __init__(self, model: str, device: torch.device, work: Path) -> None:
        self.model, self.device, self.work = model, device, work
        self.cuda = device.type == "cuda"
        pipe = (
            sd15_pipeline(work) if model == "sd15" else build_tiny_pipeline(TinyModelConfig(), work / "tok")
        )
        self.res = RESOLUTION[model]
        frozen = torch.bfloat16 if self.cuda else torch.float32
        pipe.vae.to(device, frozen).requires_grad_(False)
        pipe.text_encoder.to(device, frozen).requires_grad_(False)
        self.pipe = pipe
        self.unet0 = pipe.unet.requires_grad_(
            False
        )  # fp32 initial weights, on the CPU; copies go to the device
        g = torch.Generator().manual_seed(0)
        self.images = ImageSet(
            torch.rand(4, 3, self.res, self.res, generator=g) * 2 - 1, list("abcd"), [None] * 4
        )
        self.tracker = StageTracker("bench", TrackingConfig(enabled=False), work / "track")
        self.compute = ComputeConfig()  # the project side's levers (--project-compute)

    def memory_mark(self) -> tuple[int, int]:
        """Allocated and reserved bytes now (the allocator's cache emptied first), peaks reset."""
        sync(self.device)
        if not self.cuda:
            return 0, 0
        gc.collect()  # a previous comparison's graphs and buffers
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated(), torch.cuda.memory_reserved()

    def peak_gib(self, mark: tuple[int, int], shared: tuple[int, int]) -> tuple[float, float]:
        """Peak allocated and reserved GiB since ``mark``, plus ``shared`` (the frozen modules both sides use)."""
        if not self.cuda:
            return math.nan, math.nan
        peaks = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
        return tuple((peak - m + s) / 2**30 for peak, m, s in zip(peaks, mark, shared, strict=True))

    # -- training -----------------------------------------------------------------------------------------------
    def unet_copy(self, lora_rank: int = 0) -> torch.nn.Module:
        unet = copy.deepcopy(self.unet0).to(self.device)
        if lora_rank:
            torch.manual_seed(0)
            unet.add_adapter(PeftLoraConfig(r=lora_rank, lora_alpha=lora_rank, init_lora_weights="gaussian",
                                            target_modules=LORA_TARGETS))  # fmt: skip
        else:
            unet.requires_grad_(True)
        return unet

    def train_cfg(self, lora: bool, checkpointing: bool = False) -> TrainConfig:
        never = {"max_train_steps": 100_000, "checkpointing_steps": 10**9, "validation_steps": 10**9}
        lr = 5e-4 if lora else (2e-6 if self.model == "sd15" else 4e-4)
        return TrainConfig(
            resolution=self.res, learning_rate=lr, gradient_checkpointing=checkpointing, **never
        )

    def trainer(self, unet: torch.nn.Module, cfg: TrainConfig, compute: ComputeConfig, name: str):
        """A DiffusionTrainer over ``unet``'s trainable parameters on the cached latents of the four images."""
        apply_training_levers(unet, cfg, compute, self.device)
        if cfg.gradient_checkpointing:
            enable_gradient_checkpointing(unet)
        data = TrainingData(
            instance=encode_latents(self.pipe.vae, self.images),
            instance_embeds=encode_prompt(self.pipe, INSTANCE_PROMPT),
            class_probe=encode_latents(self.pipe.vae, self.images),
            class_embeds=encode_prompt(self.pipe, CLASS_PROMPT),
            with_prior=True,
        )
        params = {n: p for n, p in unet.named_parameters() if p.requires_grad}
        store = CheckpointStore(self.work / f"ckpt-{name}", name, 1)
        acc = accelerator_for(cfg, self.device)
        return DiffusionTrainer(cfg, unet, self.pipe_scheduler(), data, params, store, self.tracker, acc,
                                compute=compute)  # fmt: skip

    def pipe_scheduler(self):
        from diffusers import DDPMScheduler

        return DDPMScheduler.from_config(self.pipe.scheduler.config)

    def plain_step(self, unet: torch.nn.Module, cfg: TrainConfig, lora: bool) -> Callable[[int], None]:
        """train_dreambooth(_lora).py's step over ``unet`` (the LoRA script keeps the frozen UNet in bf16)."""
        if lora and self.cuda:
            unet.to(torch.bfloat16)
            for p in unet.parameters():
                if p.requires_grad:
                    p.data = p.data.float()
        if cfg.gradient_checkpointing:
            unet.enable_gradient_checkpointing()  # the scripts' --gradient_checkpointing
        pipe = copy.copy(self.pipe)
        pipe.unet = unet
        pixels = self.images.pixels[:2].to(self.device)
        ids = torch.cat([prompt_ids(pipe, INSTANCE_PROMPT), prompt_ids(pipe, CLASS_PROMPT)]).to(self.device)
        params = [p for p in unet.parameters() if p.requires_grad]
        return baseline_step_fn(pipe, cfg, pixels, ids, params, None)


def timed_rounds(sides: dict[str, Callable[[int], float]], repeats: int) -> dict[str, object]:
    """``repeats`` rounds of each side in turn; each call returns its rate. Median/min/max per side and of the
    per-round ratio project/plain."""
    rates: dict[str, list[float]] = {name: [] for name in sides}
    for r in range(repeats):
        for name, block in sides.items():
            rates[name].append(block(r))
    ratios = [p / b for p, b in zip(rates["project"], rates["plain"], strict=True)]
    return {
        **{name: summary(v) | {"runs": v} for name, v in rates.items()},
        "ratio": summary(ratios) | {"runs": ratios},
    }


def compare_training(
    bench: Bench,
    name: str,
    lora_rank: int,
    steps: int,
    warmup: int,
    repeats: int,
    checkpointing: bool = False,
) -> dict:
    """Plain vs project step rates (interleaved) and each side's peak memory; ``checkpointing``: gradient
    checkpointing on both sides."""
    lora = lora_rank > 0
    cfg = bench.train_cfg(lora, checkpointing)
    shared = bench.memory_mark()
    mark = bench.memory_mark()
    plain = bench.plain_step(bench.unet_copy(lora_rank), cfg, lora)
    for i in range(warmup):
        plain(i)
    sync(bench.device)
    plain_peak = bench.peak_gib(mark, shared)
    mark = bench.memory_mark()
    trainer = bench.trainer(bench.unet_copy(lora_rank), cfg, bench.compute, f"{name}-project")
    t0 = time.perf_counter()
    trainer.train_steps(0, warmup)
    sync(bench.device)
    first_call_s = time.perf_counter() - t0  # capture (and compile of the optimizer kernel) included
    project_peak = bench.peak_gib(mark, shared)
    step = {"plain": warmup, "project": warmup}

    def plain_block(_: int) -> float:
        sync(bench.device)
        t = time.perf_counter()
        for i in range(step["plain"], step["plain"] + steps):
            plain(i)
        sync(bench.device)
        step["plain"] += steps
        return steps / (time.perf_counter() - t)

    def project_block(_: int) -> float:
        sync(bench.device)
        t = time.perf_counter()
        trainer.train_steps(step["project"], step["project"] + steps)
        sync(bench.device)
        step["project"] += steps
        return steps / (time.perf_counter() - t)

    result = timed_rounds({"plain": plain_block, "project": project_block}, repeats)
    result.update(plain_peak_GiB=plain_peak[0], project_peak_GiB=project_peak[0],
                  plain_reserved_GiB=plain_peak[1], project_reserved_GiB=project_peak[1],
                  project_first_call_s=first_call_s,
                  graphed=trainer.graph_blocker is None, graph_blocker=trainer.graph_blocker,
                  optimizer=type(getattr(trainer.optimizer, "optimizer", trainer.optimizer)).__name__)  # fmt: skip
    return result


def check_training(bench: Bench, steps: int, lora_rank: int = 0) -> dict[str, float]:
    """The project's default (fast) step against its eager path with bitsandbytes (CUDA) from the same weights on
    the same batches: first-step loss, per-step losses, and the weights after ``steps`` steps."""
    cfg = bench.train_cfg(lora_rank > 0)
    fast = bench.trainer(bench.unet_copy(lora_rank), cfg, bench.compute, "check-fast")
    eager = bench.trainer(bench.unet_copy(lora_rank), cfg, EAGER, "check-eager")
    w0 = torch.cat([p.detach().float().reshape(-1).cpu() for p in eager.params.values()])
    fast.train_steps(0, steps)
    eager.train_steps(0, steps)
    wf = torch.cat([p.detach().float().reshape(-1).cpu() for p in fast.params.values()])
    we = torch.cat([p.detach().float().reshape(-1).cpu() for p in eager.params.values()])
    lf = torch.tensor([h["loss"] for h in fast.history])
    le = torch.tensor([h["loss"] for h in eager.history])
    update = (we - w0).norm()
    out = {
        "steps": float(steps),
        "optimizer_fast": type(getattr(fast.optimizer, "optimizer", fast.optimizer)).__name__,
        "optimizer_eager": type(getattr(eager.optimizer, "optimizer", eager.optimizer)).__name__,
        "graphed": fast.graph_blocker is None,
        "first_loss_fast": float(lf[0]),
        "first_loss_eager": float(le[0]),
        "first_loss_rel_diff": float((lf[0] - le[0]).abs() / le[0].abs()),
        "loss_rel_diff_max": float(((lf - le).abs() / le.abs()).max()),
        "weights_update_norm_eager": float(update),
        "weights_diff_over_update": float((wf - we).norm() / update) if update > 0 else math.nan,
        "weights_update_cosine": float(
            torch.nn.functional.cosine_similarity((wf - w0).double(), (we - w0).double(), dim=0)
        ),  # in float64: a float32 norm over ~860M elements drifts past 1
    }
    out["passed"] = (
        out["first_loss_rel_diff"] <= CHECK_FIRST_LOSS_REL
        and out["weights_diff_over_update"] <= CHECK_WEIGHTS_REL
        and out["weights_update_cosine"] >= CHECK_UPDATE_COSINE
    )
    del fast, eager
    return out


# -- sampling -------------------------------------------------------------------------------------------------------
def sampling_pipe(bench: Bench):
    """A copy of the pipeline for sampling: fp16 on CUDA (what both sides sample with), fp32 on the CPU."""
    pipe = copy.copy(bench.pipe)
    dtype = torch.float16 if bench.cuda else torch.float32
    pipe.unet = copy.deepcopy(bench.unet0).to(bench.device, dtype)
    pipe.vae = copy.deepcopy(bench.pipe.vae).to(bench.device, dtype)
    pipe.text_encoder = copy.deepcopy(bench.pipe.text_encoder).to(bench.device, dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def plain_images(
    pipe, prompts: list[str], seeds: list[int], steps: int, batch: int, res: int
) -> list[np.ndarray]:
    """The plain pipeline over ``prompts`` (one per image), ``batch`` images per call, one generator per image."""
    out: list[np.ndarray] = []
    for k in range(0, len(prompts), batch):
        images = pipe(prompts[k : k + batch], num_inference_steps=steps, guidance_scale=7.5, height=res,
                      width=res, output_type="np",
                      generator=[torch.Generator().manual_seed(s) for s in seeds[k : k + batch]]).images  # fmt: skip
        out.extend(list(images))
    return out


def compare_sampling(bench: Bench, kind: str, images: int, plain_batches: list[int], repeats: int) -> dict:
    """Class images (50 steps, one prompt) or infer (30 steps, five prompts): plain at its best batch vs the project."""
    from stages import class_images
    from stages.lib.sampling import inference

    steps = 50 if kind == "class_images" else 30
    plain_pipe, project_pipe = sampling_pipe(bench), sampling_pipe(bench)
    cfg = PipelineConfig(compute=bench.compute)
    cfg.class_images.num_inference_steps, cfg.class_images.guidance_scale = steps, 7.5
    prepare_project_pipe(project_pipe, cfg.compute)
    if kind == "class_images":
        prompts, seeds = [CLASS_PROMPT] * images, [cfg.class_images.seed + i for i in range(images)]
    else:
        per = max(1, images // len(INFER_PROMPTS))
        prompts = [p for p in INFER_PROMPTS for _ in range(per)]
        seeds = [inference.image_seed(0, p, i) for p in range(len(INFER_PROMPTS)) for i in range(per)]
    best = {}
    for b in plain_batches:  # the plain pipeline's best batch size, one pass each
        sync(bench.device)
        t = time.perf_counter()
        plain_images(plain_pipe, prompts, seeds, steps, b, bench.res)
        sync(bench.device)
        best[b] = len(prompts) / (time.perf_counter() - t)
    batch = max(best, key=best.get)
    work = bench.work / f"sample-{kind}"

    def plain_block(_: int) -> float:
        sync(bench.device)
        t = time.perf_counter()
        plain_images(plain_pipe, prompts, seeds, steps, batch, bench.res)
        sync(bench.device)
        return len(prompts) / (time.perf_counter() - t)

    def project_run(r: int) -> list[Path]:
        out = work / f"r{r}"
        if kind == "class_images":
            out.mkdir(parents=True, exist_ok=True)
            class_images.write_images(project_pipe, cfg, out, list(range(images)), bench.res)
            return [out / class_images.image_name(i) for i in range(images)]
        result = inference.generate(project_pipe, INFER_PROMPTS, seed=0, num_images_per_prompt=per,
                                    num_inference_steps=steps, guidance_scale=7.5, height=bench.res,
                                    width=bench.res, out_dir=out)  # fmt: skip
        return [f for p in INFER_PROMPTS for f in result.files[p]]

    def project_block(r: int) -> float:
        sync(bench.device)
        t = time.perf_counter()
        project_run(r)
        sync(bench.device)
        return len(prompts) / (time.perf_counter() - t)

    t0 = time.perf_counter()
    project_block(-1)  # first call: levers applied, kernels chosen (and compiled when compute.compile_unet)
    first_call_s = time.perf_counter() - t0
    result = timed_rounds({"plain": plain_block, "project": project_block}, repeats)
    result["project_first_call_s"] = first_call_s
    # the check: same seeds, same images (the project's PNGs against the plain pipeline's arrays)
    from PIL import Image

    ref = plain_images(plain_pipe, prompts, seeds, steps, batch, bench.res)
    ours = [np.asarray(Image.open(f).convert("RGB"), dtype=np.float32) / 255 for f in project_run(repeats)]
    diff = np.abs(np.stack(ours) - np.stack(ref))
    result.update(steps=steps, images=len(prompts), plain_best_batch=batch, plain_batch_rates=best,
                  check_mean_abs_diff=float(diff.mean()), check_max_abs_diff=float(diff.max()),
                  check_p99_abs_diff=float(np.quantile(diff, 0.99)),
                  check_passed=bool(diff.mean() <= CHECK_IMAGE_MEAN_ABS))  # fmt: skip
    return result


def prepare_project_pipe(pipe, compute: ComputeConfig) -> None:
    """The levers the project's samplers apply to their pipeline (stages/lib/sampling/sampler.py)."""
    from stages.lib.sampling import sampler

    sampler.prepare_for_sampling(pipe, compute)


def environment(device: torch.device) -> dict[str, object]:
    import diffusers
    import transformers

    return {
        "device": torch.cuda.get_device_name()
        if device.type == "cuda"
        else f"cpu ({torch.get_num_threads()})",
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=sorted(RESOLUTION), default="sd15")
    parser.add_argument("--device", help="default: cuda for sd15, cpu for tiny")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20, help="training steps per timed block")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--check-steps", type=int, default=50)
    parser.add_argument("--sample-images", type=int, default=32, help="images per timed sampling block")
    parser.add_argument("--plain-batches", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--only", nargs="+", default=["check", "dreambooth", "lora_r4", "lora_r24", "class_images",
                                                       "infer"])  # fmt: skip
    parser.add_argument("--project-compute", nargs="*", default=[], metavar="KEY=VALUE",
                        help="compute levers of the project side, e.g. channels_last=false")  # fmt: skip
    parser.add_argument("--out", type=Path)
    parser.add_argument(
        "--table", type=Path, metavar="JSON", help="print the markdown table of a results file"
    )
    args = parser.parse_args()
    if args.table:
        print(markdown_table(json.loads(args.table.read_text())), end="")
        return
    device = torch.device(args.device or ("cuda" if args.model == "sd15" else "cpu"))
    work = Path(tempfile.mkdtemp())
    results: dict[str, object] = {
        "model": args.model,
        **environment(device),
        "args": vars(args) | {"out": str(args.out)},
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the 8-bit fallback warning on the CPU
        bench = Bench(args.model, device, work)
        for item in args.project_compute:
            key, _, value = item.partition("=")
            setattr(bench.compute, key, value.lower() in ("1", "true", "yes"))
        results["project_compute"] = vars(bench.compute)
        for part in args.only:
            t = time.perf_counter()
            if part == "check":
                results["check_dreambooth"] = check_training(bench, args.check_steps)
            elif part in ("dreambooth", "dreambooth_gc"):
                results[part] = compare_training(
                    bench,
                    part,
                    0,
                    args.steps,
                    args.warmup,
                    args.repeats,
                    checkpointing=part == "dreambooth_gc",
                )
            elif part.startswith("lora_r"):
                rank = int(part.removeprefix("lora_r"))
                results[part] = compare_training(bench, part, rank, args.steps, args.warmup, args.repeats)
            else:
                results[part] = compare_sampling(
                    bench, part, args.sample_images, args.plain_batches, args.repeats
                )
            print(f"[{part}] {time.perf_counter() - t:.0f} s", flush=True)
            if args.out:  # written after every part: a call cut short keeps what it measured
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps(results, indent=1) + "\n")
            if device.type == "cuda":
                torch.cuda.empty_cache()
    print(json.dumps(results, indent=1))
    print_table(results)


ROW_NAMES = {
    "dreambooth": ("DreamBooth step (batch 1 + 1 prior)", "it/s"),
    "dreambooth_gc": ("DreamBooth step, gradient checkpointing (both sides)", "it/s"),
    "lora_r4": ("LoRA r4 step", "it/s"),
    "lora_r24": ("LoRA r24 step", "it/s"),
    "class_images": ("class images (50 steps, CFG 7.5)", "img/s"),
    "infer": ("infer (30 steps, CFG 7.5, 5 prompts)", "img/s"),
}


def markdown_table(results: dict) -> str:
    """The README's GPU table from a results JSON: median (min-max) of each side and of the ratio, peak memory."""
    lines = [
        f"{results['device']}, torch {results['torch']}, diffusers {results['diffusers']}; "
        f"{results['args']['repeats']} interleaved rounds, median (min-max):",
        "",
        "| work | plain diffusers | this project | ratio | peak GiB allocated (reserved): plain / project |",
        "|---|---|---|---|---|",
    ]
    for key, (label, unit) in ROW_NAMES.items():
        row = results.get(key)
        if row is None:
            continue
        cells = [
            f"{row[s]['median']:.2f} {unit} ({row[s]['min']:.2f}-{row[s]['max']:.2f})"
            for s in ("plain", "project")
        ]
        r = row["ratio"]
        peak = (
            " / ".join(memory_cell(row, side) for side in ("plain", "project"))
            if "plain_peak_GiB" in row
            else "-"
        )
        lines.append(
            f"| {label} | {cells[0]} | {cells[1]} | **{r['median']:.2f}x** ({r['min']:.2f}-{r['max']:.2f}) | {peak} |"
        )
    return "\n".join(lines) + "\n" + checks_line(results)


def memory_cell(row: dict, side: str) -> str:
    """``allocated (reserved)`` peak GiB of one side; results written before reserved was recorded show the first."""
    reserved = row.get(f"{side}_reserved_GiB")
    return f"{row[f'{side}_peak_GiB']:.1f}" + ("" if reserved is None else f" ({reserved:.1f})")


def checks_line(results: dict) -> str:
    """The numerical checks of the same run, in one sentence."""
    parts = []
    if (c := results.get("check_dreambooth")) is not None:
        parts.append(
            f"the captured step's first loss is the eager step's within {c['first_loss_rel_diff']:.1e} (relative); "
            f"after {c['steps']:.0f} steps its weights differ from bitsandbytes' eager AdamW8bit path by "
            f"{c['weights_diff_over_update']:.3f} of that path's update"
        )
    images = [(k, results[k]["check_mean_abs_diff"]) for k in ("class_images", "infer") if k in results]
    if images:
        diffs = ", ".join(f"{k} {d:.4f}" for k, d in images)
        parts.append(
            f"the samplers' images differ from the plain pipeline's by a mean |diff| of {diffs} (0-1 scale)"
        )
    return f"\nChecks in the same run: {'; '.join(parts)}.\n" if parts else ""


def print_table(results: dict) -> None:
    """One line per comparison: median (min-max) of each side and of the ratio."""
    for name, row in results.items():
        if not isinstance(row, dict) or "ratio" not in row:
            continue
        p, q, r = row["plain"], row["project"], row["ratio"]
        print(f"{name:13s} plain {p['median']:7.2f} ({p['min']:.2f}-{p['max']:.2f}) | project {q['median']:7.2f} "
              f"({q['min']:.2f}-{q['max']:.2f}) | ratio {r['median']:.2f}x ({r['min']:.2f}-{r['max']:.2f})")  # fmt: skip
    if "check_dreambooth" in results:
        print("check", json.dumps(results["check_dreambooth"]))


if __name__ == "__main__":
    main()
