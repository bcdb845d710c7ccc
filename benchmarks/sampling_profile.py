"""Where the project sampler's time goes, against ``StableDiffusionPipeline`` at the same batch.

One process, one model, interleaved rounds of: the plain pipeline (decoded arrays), the plain pipeline stopping at
latents (UNet + scheduler only), ``inference.generate`` without writing files, and ``inference.generate`` writing
its PNGs. The gaps between them locate the cost: denoising loop, VAE decode, image writing. ``--profile`` adds
torch.profiler's top kernels of one project call and one plain call. A diagnostic: the performance claims live in
``benchmarks/speed.py``.

    python -m benchmarks.sampling_profile --out /tmp/sampling.json                 # SD1.5 size on one GPU
    python -m benchmarks.sampling_profile --model tiny --device cpu --rounds 1 --images-per-prompt 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks.speed import INFER_PROMPTS, Bench, plain_images, sampling_pipe, sync
from stages.lib.config.schema import ComputeConfig
from stages.lib.sampling import inference, sampler


def timed(device: torch.device, fn: Callable[[], object]) -> float:
    """Seconds ``fn`` takes, the device synchronised on both ends."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def profile_table(fn: Callable[[], object], rows: int = 15) -> str:
    """torch.profiler's kernels of one call of ``fn``, by device time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        fn()
    key = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=60)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=["sd15", "tiny"], default="sd15")
    parser.add_argument("--device", default=None, help="default: cuda for sd15, cpu for tiny")
    parser.add_argument("--images-per-prompt", type=int, default=2, help="of each of the 5 infer prompts")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--profile", action="store_true", help="print torch.profiler tables")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if args.model == "sd15" else "cpu"))
    bench = Bench(args.model, device, Path(tempfile.mkdtemp()))
    plain, project = sampling_pipe(bench), sampling_pipe(bench)
    sampler.prepare_for_sampling(project, ComputeConfig())
    per = args.images_per_prompt
    prompts = [p for p in INFER_PROMPTS for _ in range(per)]
    seeds = [inference.image_seed(0, p, i) for p in range(len(INFER_PROMPTS)) for i in range(per)]
    res = bench.res

    def project_call(out_dir: Path | None) -> Callable[[], object]:
        return lambda: inference.generate(
            project, INFER_PROMPTS, seed=0, num_images_per_prompt=per, num_inference_steps=args.steps,
            guidance_scale=7.5, height=res, width=res, out_dir=out_dir,
        )  # fmt: skip

    def plain_latents() -> object:
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        return plain(prompts, num_inference_steps=args.steps, guidance_scale=7.5, height=res, width=res,
                     output_type="latent", generator=generators)  # fmt: skip

    sides: dict[str, Callable[[], object]] = {
        "plain": lambda: plain_images(plain, prompts, seeds, args.steps, len(prompts), res),
        "plain_latents_only": plain_latents,
        "project_no_files": project_call(None),
        "project_with_pngs": lambda: project_call(Path(tempfile.mkdtemp()))(),
    }
    for fn in sides.values():  # first calls: kernels chosen, levers applied
        fn()
    seconds: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(args.rounds):
        for name, fn in sides.items():
            seconds[name].append(timed(device, fn))
    results = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "model": args.model,
        "images": len(prompts),
        "steps": args.steps,
        "sides": {
            name: {
                "median_s": statistics.median(v),
                "img_per_s": len(prompts) / statistics.median(v),
                "runs": v,
            }
            for name, v in seconds.items()
        },
    }
    for name, row in results["sides"].items():
        print(f"{name:20s} {row['median_s']:.3f} s  {row['img_per_s']:.2f} img/s")
    if args.profile:
        print(profile_table(project_call(None)))
        print(profile_table(sides["plain"]))
    if args.out:
        args.out.write_text(json.dumps(results, indent=1) + "\n")
    return results


if __name__ == "__main__":
    main()
