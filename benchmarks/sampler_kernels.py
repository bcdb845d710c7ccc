"""Kernel choices for the sampler's UNet forward at the class-image batch: what each costs the first time and
what it gains after (SD1.5, fp16, batch 64 = 32 images with classifier-free guidance; ``--model tiny`` for the
embedded default on the CPU).

Modes: ``eager`` (NCHW, PyTorch's default kernels: what the sampler and ``StableDiffusionPipeline`` run), ``nhwc``
(channels-last), ``cudnn_benchmark`` / ``nhwc_cudnn_benchmark`` (``torch.backends.cudnn.benchmark``: cuDNN times
its algorithms for each new shape), ``regional`` (``torch.compile`` of each ``BasicTransformerBlock``, diffusers'
``compile_repeated_blocks``), ``regional_resnets`` (also each ``ResnetBlock2D``, ``Downsample2D``,
``Upsample2D``), ``full`` (``torch.compile`` of the whole UNet).

1. First use: each mode in a fresh process with empty Inductor and Triton caches times its first call and its
   second (a new timestep); compiled modes run once more in a fresh process with the cache the first one filled
   (what a later stage or run pays).
2. Steady state: one process builds every mode (compiled ones from those caches) and runs ``--repeats`` rounds of
   ``--calls`` forwards per mode, interleaved; median and min-max per mode and of the per-round ratio to
   ``eager``. Each mode's output on the same inputs is compared with ``eager``'s.

    python -m benchmarks.sampler_kernels --out benchmarks/results/sampler_kernels_h100.json
    python -m benchmarks.sampler_kernels --table benchmarks/results/sampler_kernels_h100.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.report_files import add_report_arguments, printed_table, write_report

MODES = ("eager", "nhwc", "cudnn_benchmark", "nhwc_cudnn_benchmark", "regional", "regional_resnets", "full")
COMPILED = {"regional": ("BasicTransformerBlock",), "full": ()}
COMPILED["regional_resnets"] = COMPILED["regional"] + ("ResnetBlock2D", "Downsample2D", "Upsample2D")
TIMESTEPS = (981, 501, 21)
DEFAULT_MODES = tuple(m for m in MODES if m != "full")  # a full compile's first call takes minutes


def build_unet(model: str, device: str) -> Any:
    """The UNet with random weights (seeded): SD1.5's architecture, or the embedded tiny default's."""
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    with torch.device(device):  # initialised where it runs: SD1.5's 860 M parameters take seconds on a CPU
        if model == "sd15":
            from stages.lib.models.loading import SD15_CONFIG_DIR

            config = UNet2DConditionModel.load_config(SD15_CONFIG_DIR / "unet")
            unet = UNet2DConditionModel.from_config(config)
        else:
            from stages.lib.miniature.tiny_model import TinyModelConfig, tiny_unet

            unet = tiny_unet(TinyModelConfig())
    dtype = torch.float16 if device == "cuda" else torch.float32
    return unet.to(device, dtype).eval().requires_grad_(False)


def apply_mode(unet: Any, mode: str) -> Any:
    """``unet`` set up for ``mode`` in place (layout, compilation); cuDNN's benchmark flag is set per call."""
    import torch

    if mode.startswith("nhwc"):
        unet.to(memory_format=torch.channels_last)
    if mode == "full":
        unet.compile()
    elif mode in COMPILED:
        for module in unet.modules():
            if type(module).__name__ in COMPILED[mode]:
                module.compile()
    return unet


class Inputs:
    """Seeded latents and text states for a batch; ``call(unet, i, mode)`` runs forward ``i`` (timestep cycles)."""

    def __init__(self, unet: Any, batch: int, seed: int = 1) -> None:
        import torch

        param = next(unet.parameters())
        size, dim = unet.config.sample_size, unet.config.cross_attention_dim
        g = torch.Generator(param.device).manual_seed(seed)
        self.latents = torch.randn(
            batch, unet.config.in_channels, size, size, generator=g, device=param.device
        )
        self.latents = self.latents.to(param.dtype)
        self.states = torch.randn(batch, 77, dim, generator=g, device=param.device).to(param.dtype)
        self.timesteps = [torch.tensor(t, device=param.device) for t in TIMESTEPS]
        self.device = param.device

    def call(self, unet: Any, i: int, mode: str) -> Any:
        import torch

        torch.backends.cudnn.benchmark = "cudnn_benchmark" in mode
        latents = self.latents
        if mode.startswith("nhwc"):
            latents = latents.contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            out = unet(latents, self.timesteps[i % len(self.timesteps)], encoder_hidden_states=self.states)
        return out.sample

    def seconds(self, fn: Callable[[], object]) -> float:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t


def first_use(mode: str, model: str, device: str, batch: int) -> dict[str, float]:
    """This process's first and second call of ``mode`` (run in a fresh process; caches from the environment)."""
    import torch

    torch._dynamo.config.cache_size_limit = 64
    t = time.perf_counter()
    unet = apply_mode(build_unet(model, device), mode)
    inputs = Inputs(unet, batch)
    setup = time.perf_counter() - t
    first = inputs.seconds(lambda: inputs.call(unet, 0, mode))
    second = inputs.seconds(lambda: inputs.call(unet, 1, mode))
    return {"setup_s": setup, "first_call_s": first, "second_call_s": second}


def steady_state(modes: list[str], model: str, device: str, batch: int, repeats: int, calls: int) -> dict:
    """Interleaved rounds of every mode in this process; per-mode seconds per call and output differences."""
    import torch

    torch._dynamo.config.cache_size_limit = 64
    base = build_unet(model, device)
    unets = {m: apply_mode(copy.deepcopy(base), m) for m in modes}
    del base
    inputs = Inputs(unets[modes[0]], batch)
    reference = inputs.call(unets["eager"], 0, "eager").float()
    result: dict[str, dict[str, Any]] = {}
    for mode, unet in unets.items():
        out = inputs.call(unet, 0, mode).float()  # also the warm-up (compiled from the cache)
        inputs.call(unet, 1, mode)
        diff = (out - reference).abs()
        result[mode] = {"calls_s": [], "max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
                        "mean_abs_output": float(reference.abs().mean())}  # fmt: skip
    for r in range(repeats):
        order = modes if r % 2 == 0 else modes[::-1]
        for mode in order:
            unet = unets[mode]
            seconds = inputs.seconds(lambda m=mode, u=unet: [inputs.call(u, i, m) for i in range(calls)])
            result[mode]["calls_s"].append(seconds / calls)
    for row in result.values():
        times = row["calls_s"]
        ratios = [e / t for e, t in zip(result["eager"]["calls_s"], times, strict=True)]
        row |= {"ms_median": 1000 * statistics.median(times), "ms_min": 1000 * min(times),
                "ms_max": 1000 * max(times), "speedup_median": statistics.median(ratios),
                "speedup_min": min(ratios), "speedup_max": max(ratios)}  # fmt: skip
    return result


def run_child(args: list[str], cache: Path | None) -> dict[str, float]:
    """``python -m benchmarks.sampler_kernels <args>`` in a fresh process (Inductor and Triton caches in ``cache``)."""
    env = dict(os.environ)
    if cache is not None:
        env |= {"TORCHINDUCTOR_CACHE_DIR": str(cache / "inductor"), "TRITON_CACHE_DIR": str(cache / "triton")}
    child = [sys.executable, "-m", "benchmarks.sampler_kernels", *args]
    done = subprocess.run(child, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def markdown_table(report: dict) -> str:
    """The result as a Markdown table, with its header line."""
    lines = [
        f"{report['device']}, torch {report['versions']['torch']}, diffusers {report['versions']['diffusers']}; "
        f"{report['model']} UNet, {report['dtype']}, batch {report['batch']}; {report['repeats']} interleaved rounds "
        f"of {report['calls']} forwards, median (min-max):",
        "",
        "| mode | first call, empty cache (s) | first call, cache filled (s) | forward (ms) | vs eager "
        "| output mean / max abs diff |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for mode, row in report["steady"].items():
        first = report["first_use"][mode]
        warm = report["first_use_cached"].get(mode)
        cached = f"{warm['first_call_s']:.1f}" if warm else "-"
        lines.append(
            f"| {mode} | {first['first_call_s']:.1f} | {cached} "
            f"| {row['ms_median']:.1f} ({row['ms_min']:.1f}-{row['ms_max']:.1f}) "
            f"| {row['speedup_median']:.2f}x ({row['speedup_min']:.2f}-{row['speedup_max']:.2f}) "
            f"| {row['mean_abs_diff']:.1e} / {row['max_abs_diff']:.1e} |"
        )
    mean_out = next(iter(report["steady"].values()))["mean_abs_output"]
    lines += ["", f"Mean |output| of eager: {mean_out:.3f}."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(DEFAULT_MODES))
    parser.add_argument("--model", choices=("sd15", "tiny"), default="sd15")
    parser.add_argument("--device", help="default: cuda for sd15, cpu for tiny")
    parser.add_argument("--batch", type=int, help="UNet batch (images x 2 with guidance); sd15 64, tiny 16")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--calls", type=int, default=5, help="forwards per mode and round")
    parser.add_argument("--first-use", choices=MODES, help=argparse.SUPPRESS)  # one mode, in a child process
    add_report_arguments(parser)
    args = parser.parse_args(argv)
    if printed_table(args, markdown_table):
        return 0
    device = args.device or ("cuda" if args.model == "sd15" else "cpu")
    batch = args.batch or (64 if args.model == "sd15" else 16)
    common = ["--model", args.model, "--device", device, "--batch", str(batch)]
    if args.first_use:
        print(json.dumps(first_use(args.first_use, args.model, device, batch)), flush=True)
        return 0
    modes = list(dict.fromkeys(["eager", *args.modes]))
    import diffusers
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device")
    report: dict[str, Any] = {
        "benchmark": "sampler_kernels", "model": args.model, "batch": batch, "repeats": args.repeats,
        "calls": args.calls, "dtype": "fp16" if device == "cuda" else "fp32",
        "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__},
        "first_use": {}, "first_use_cached": {},
    }  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        shared = Path(tmp) / "shared"
        for mode in modes:
            cache = Path(tmp) / mode
            report["first_use"][mode] = run_child(["--first-use", mode, *common], cache)
            if mode in COMPILED:
                report["first_use_cached"][mode] = run_child(["--first-use", mode, *common], cache)
                for part in ("inductor", "triton"):
                    if (cache / part).is_dir():
                        shutil.copytree(cache / part, shared / part, dirs_exist_ok=True)
            print(mode, report["first_use"][mode], report["first_use_cached"].get(mode, ""), flush=True)
        os.environ |= {
            "TORCHINDUCTOR_CACHE_DIR": str(shared / "inductor"),
            "TRITON_CACHE_DIR": str(shared / "triton"),
        }
        report["steady"] = steady_state(modes, args.model, device, batch, args.repeats, args.calls)
    print(markdown_table(report))
    write_report(args.out, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
