"""Multi-process scaling of the two data-parallel workloads: class-image generation and training.

For each process count N (``--processes 1 2``) the same work runs once through ``accelerate launch`` (N = 1:
one plain process), with the project's own code:
- class images: ``stages.class_images.write_images`` on the index shard ``rank::N`` of ``--class-images`` images
  (the stage's sharding), timed between barriers after one warm-up batch per process; every index must be
  written exactly once;
- training: ``DiffusionTrainer`` (DreamBooth: the full UNet, LoRA r4) at a fixed *global* batch of instance
  examples (``--global-batch``, plus as many prior examples), i.e. ``train_batch_size = G / N`` per process
  (strong scaling), and at batch 1 per process, i.e. global batch N (``*_b1_per_process``: weak scaling, what
  ``compute.num_processes=N`` does to the recipe's batch 1).
It prints throughput per N and the speedup / scaling efficiency against N = 1 measured in the same run.

Random weights, nothing downloaded: ``--model sd15`` the SD1.5 configs at 512 px (CUDA: one GPU per process,
NCCL), ``--model tiny`` the embedded default's architecture at 64 px (CPU: processes over gloo).

    python -m benchmarks.multi_gpu --processes 1 2 --out benchmarks/results_h200x2.json      # 2 GPUs
    python -m benchmarks.multi_gpu --model tiny --processes 1 2 --class-images 8 --steps 10  # CPU, gloo
    python -m benchmarks.multi_gpu --table benchmarks/results_h200_multi_gpu_n1.json          # docs' tables
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import replace
from pathlib import Path

import torch
from peft import LoraConfig as PeftLoraConfig

from benchmarks.train_step import RESOLUTION, project_step_fn, sd15_pipeline, timed
from stages.class_images import image_name, load_sampler, write_images
from stages.lib.config.schema import (
    ComputeConfig,
    PipelineConfig,
    TinyModelConfig,
    TrackingConfig,
    TrainConfig,
)
from stages.lib.miniature.tiny_model import build_tiny_pipeline
from stages.lib.models.loading import load_pipeline, resolve_device
from stages.lib.runtime.distributed import (
    barrier,
    is_main_process,
    launch_command,
    launch_env,
    launched,
    world,
)
from stages.lib.tracking.tracker import StageTracker
from stages.lib.training.data import ImageSet

# Never let a launched program switch NVLink multicast on (the GPU hosts are shared).
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
NEVER = {"max_train_steps": 10**6, "checkpointing_steps": 10**9, "validation_steps": 10**9}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    barrier()


def _release(device: torch.device) -> None:
    """Free what the last measurement left (models, optimizer states) before the next one."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def class_image_rate(args: argparse.Namespace, base: Path, out: Path) -> dict[str, float]:
    """Images per second of all processes together on ``--class-images`` index-seeded images."""
    rank, processes = world()
    cfg = PipelineConfig()
    cfg.compute.device = args.device
    cfg.class_images = replace(
        cfg.class_images, sample_batch_size=args.sample_batch_size, num_inference_steps=args.sample_steps
    )
    res = RESOLUTION[args.model]
    pipe = load_sampler(cfg, base)
    device = pipe.unet.device
    warm = out / f"warmup-{rank}"
    warm.mkdir(parents=True, exist_ok=True)
    # one batch first: kernels, the allocator's pools and cuDNN's choices are not timed
    write_images(pipe, cfg, warm, list(range(args.sample_batch_size)), res)
    mine = list(range(args.class_images))[rank::processes]
    _sync(device)
    t0 = time.perf_counter()
    write_images(pipe, cfg, out, mine, res)
    _sync(device)
    seconds = time.perf_counter() - t0
    (out.parent / f"shard-{rank}.json").write_text(json.dumps(mine))
    _sync(device)
    shards = [json.loads((out.parent / f"shard-{r}.json").read_text()) for r in range(processes)]
    generated = sorted(i for shard in shards for i in shard)
    written = sorted(p.name for p in out.glob("class_*.png"))
    if generated != list(range(args.class_images)) or written != [image_name(i) for i in generated]:
        raise RuntimeError(
            f"{out}: the processes generated {generated} and wrote {len(written)} files; "
            f"expected every index below {args.class_images} exactly once"
        )
    del pipe
    _release(device)
    return {
        "images": float(args.class_images),
        "images_per_process": [float(len(shard)) for shard in shards],
        "seconds": seconds,
        "images_per_s": args.class_images / seconds,
    }


def training_rates(args: argparse.Namespace, base: Path, work: Path) -> dict[str, dict[str, float]]:
    """Steps/s and instance examples/s of DreamBooth and LoRA r4 at each global batch."""
    _, processes = world()
    device = resolve_device(ComputeConfig(device=args.device))
    pipe = load_pipeline(base).to(device)
    frozen = torch.bfloat16 if device.type == "cuda" else torch.float32
    pipe.vae.to(frozen).requires_grad_(False)
    pipe.text_encoder.to(frozen).requires_grad_(False)
    res = RESOLUTION[args.model]
    g = torch.Generator().manual_seed(0)
    images = ImageSet(torch.rand(8, 3, res, res, generator=g) * 2 - 1, [str(i) for i in range(8)], [None] * 8)
    tracker = StageTracker("bench", TrackingConfig(enabled=False), work / "reports", active=is_main_process())
    lr = 2e-6 if args.model == "sd15" else 4e-4
    results: dict[str, dict[str, float]] = {}

    def measure(name: str, params: dict[str, torch.nn.Parameter], cfg_lr: float) -> None:
        for global_batch in args.global_batch:
            if global_batch % processes:
                continue
            cfg = TrainConfig(resolution=res, learning_rate=cfg_lr, train_batch_size=global_batch // processes,
                              **NEVER)  # fmt: skip
            step = project_step_fn(pipe, cfg, images, work, params, tracker)
            _sync(device)
            r = timed(step, args.steps, args.warmup, device)
            _sync(device)
            results[f"{name}_g{global_batch}"] = {**r, "examples_per_s": r["it_per_s"] * global_batch}
            del step
            _release(device)

    pipe.unet.requires_grad_(True)
    measure("dreambooth", dict(pipe.unet.named_parameters()), lr)
    pipe.unet.requires_grad_(False)
    pipe.unet.add_adapter(
        PeftLoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                       target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    )  # fmt: skip
    measure("lora_r4", {n: p for n, p in pipe.unet.named_parameters() if p.requires_grad}, 5e-4)
    return results


def worker(args: argparse.Namespace) -> None:
    """One process of one launch: measure, and (main process) write the results of this process count."""
    rank, processes = world()
    work = args.work / f"n{processes}"
    result: dict[str, object] = {"processes": processes}
    if args.class_images:
        result["class_images"] = class_image_rate(args, args.work / "base", work / "class_images")
    if args.steps:
        result["training"] = training_rates(args, args.work / "base", work)
    if rank == 0:
        (args.work / f"result_n{processes}.json").write_text(json.dumps(result, indent=1))


def build_base(model: str, folder: Path) -> None:
    """A random-weight pipeline of the given size, saved as a diffusers folder (what models/base holds)."""
    torch.manual_seed(0)
    pipe = (
        sd15_pipeline(folder.parent)
        if model == "sd15"
        else build_tiny_pipeline(TinyModelConfig(), folder.parent / "tok")
    )
    pipe.save_pretrained(folder, safe_serialization=True)


def launch(args: argparse.Namespace, processes: int, argv: list[str]) -> dict[str, object]:
    module = "benchmarks.multi_gpu"
    compute = ComputeConfig(num_processes=processes, device=args.device)
    cmd = launch_command(compute, module, argv) if processes > 1 else [sys.executable, "-m", module, *argv]
    env = {**launch_env(compute), **NO_MULTICAST}
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, check=True)
    print(f"[{processes} process(es): {time.perf_counter() - t0:.0f} s with start-up]", flush=True)
    return json.loads((args.work / f"result_n{processes}.json").read_text())


def scaling(runs: dict[int, dict]) -> dict[str, dict[str, float]]:
    """Speedup and efficiency of every measured throughput against the single-process run."""
    one = runs[1]
    table: dict[str, dict[str, float]] = {}
    for n, run in runs.items():
        rates = {}
        if "class_images" in run:
            rates["class_images"] = (run["class_images"]["images_per_s"], one["class_images"]["images_per_s"])
        training, single = run.get("training", {}), one.get("training", {})
        for name, r in training.items():
            if name in single:
                rates[name] = (r["examples_per_s"], single[name]["examples_per_s"])
        for workload in ("dreambooth", "lora_r4"):  # weak scaling: batch 1 per process, global batch N
            if f"{workload}_g{n}" in training and f"{workload}_g1" in single:
                rates[f"{workload}_b1_per_process"] = (
                    training[f"{workload}_g{n}"]["examples_per_s"],
                    single[f"{workload}_g1"]["examples_per_s"],
                )
        for name, (rate, base) in rates.items():
            table.setdefault(name, {})[f"n{n}_rate"] = rate
            table[name][f"n{n}_speedup"] = rate / base
            table[name][f"n{n}_efficiency"] = rate / base / n
    return table


def render_table(results: dict) -> str:
    """Markdown tables of a results JSON (docs/gpu.md): per process count, DreamBooth and LoRA r4 steps/s (instance
    examples/s) and peak GiB per global batch, then class images/s; speedup against N = 1 where N > 1 was run."""
    lines = [f"{results['model']} on {results['device']}, torch {results['torch']}", ""]
    for n, run in sorted(results["runs"].items(), key=lambda item: int(item[0])):
        training = run.get("training", {})
        batches = sorted({int(name.rsplit("_g", 1)[1]) for name in training})
        if batches:
            lines += [f"| N = {n}: global batch (+ as many prior examples) | " + " | ".join(map(str, batches)) + " |",
                      "|---|" + "---|" * len(batches)]  # fmt: skip
            for workload, title in (("dreambooth", "DreamBooth"), ("lora_r4", "LoRA r4")):
                cells = []
                for g in batches:
                    r = training.get(f"{workload}_g{g}")
                    cells.append(
                        f"{r['it_per_s']:.2f} ({r['examples_per_s']:.1f}), {r['peak_GiB']:.1f}" if r else ""
                    )
                lines.append(f"| {title} it/s (examples/s), peak GiB | " + " | ".join(cells) + " |")
            lines.append("")
        if "class_images" in run:
            c = run["class_images"]
            lines.append(f"N = {n}: class images {c['images_per_s']:.2f} img/s ({c['images']:.0f} images)")
    speedups = [f"{name} N={key[1:-5]}: {row[key]:.2f}x" for name, row in results.get("scaling", {}).items()
                for key in row if key.endswith("_speedup") and key != "n1_speedup"]  # fmt: skip
    if speedups:
        lines += ["", "Speedup against N = 1: " + "; ".join(speedups)]
    return "\n".join(lines).rstrip() + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=sorted(RESOLUTION), default="sd15")
    parser.add_argument("--device", default="", help="default: cuda for sd15, cpu for tiny")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--class-images", type=int, default=48, help="0 skips class images")
    parser.add_argument("--sample-batch-size", type=int, default=4)
    parser.add_argument("--sample-steps", type=int, default=50)
    parser.add_argument("--global-batch", type=int, nargs="+", default=[1, 2, 8, 32])
    parser.add_argument("--steps", type=int, default=20, help="timed training steps (0 skips training)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--table", type=Path, help="print a results JSON as Markdown tables and stop")
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.table:
        print(render_table(json.loads(args.table.read_text())), end="")
        return
    args.device = args.device or ("cuda" if args.model == "sd15" else "cpu")
    if args.worker or launched():
        with warnings.catch_warnings():  # the CPU's 8-bit AdamW fallback warns at every optimizer
            warnings.simplefilter("ignore", RuntimeWarning)
            worker(args)
        return
    if 1 not in args.processes:
        parser.error("--processes must include 1 (the baseline of the ratios)")
    with tempfile.TemporaryDirectory(prefix="multi_gpu_") as work:  # the SD1.5 base alone is ~4 GB
        args.work = Path(work)
        build_base(args.model, args.work / "base")
        argv = sys.argv[1:] + ["--worker", "--work", str(args.work), "--device", args.device]
        runs = {n: launch(args, n, argv) for n in sorted(set(args.processes))}
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu ({os.cpu_count()} cores)"
    results = {"model": args.model, "device": device, "torch": torch.__version__, "runs": runs,
               "scaling": scaling(runs)}  # fmt: skip
    print(json.dumps(results, indent=1))
    for name, row in results["scaling"].items():
        cells = [f"N={n}: {row[f'n{n}_rate']:.2f}/s ({row[f'n{n}_speedup']:.2f}x, eff {row[f'n{n}_efficiency']:.2f})"
                 for n in sorted(runs) if f"n{n}_rate" in row]  # fmt: skip
        print(f"{name}: " + " | ".join(cells))
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
