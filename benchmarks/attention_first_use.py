"""What cuDNN's fused attention costs the first time each input shape runs, and what it gains after (CUDA only).

Each mode runs in a fresh process (first use is per process): the SD1.5 UNet (random weights, fp32 under bf16
autocast, as training runs it) times its first training step (batch 2, forward and backward), its first forward
at batch 4 / 20 / 64 (validation, probes, sampling), then the median of 10 training steps and 8 forwards at batch
64. ``cudnn_off`` turns cuDNN's attention off (``torch.backends.cuda.enable_cudnn_sdp(False)``): PyTorch then
uses its flash attention. The two modes' outputs at batch 4 are compared (two of its latents).

    python -m benchmarks.attention_first_use --out benchmarks/results/attention_first_use_h100.json
    python -m benchmarks.attention_first_use --table benchmarks/results/attention_first_use_h100.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from benchmarks.report_files import add_report_arguments, printed_table, write_report

MODES = ("cudnn_on", "cudnn_off")


def measure(mode: str, out: Path) -> dict[str, float | str]:
    """One mode's timings (this process must not have run attention yet); its batch-4 output saved to ``out``."""
    import torch
    from diffusers import UNet2DConditionModel

    from stages.lib.models.loading import SD15_CONFIG_DIR

    if mode == "cudnn_off":
        torch.backends.cuda.enable_cudnn_sdp(False)
    torch.manual_seed(0)
    config = UNet2DConditionModel.load_config(SD15_CONFIG_DIR / "unet")
    unet = UNet2DConditionModel.from_config(config).to("cuda")
    g = torch.Generator("cuda").manual_seed(1)

    def inputs(b: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return (torch.randn(b, 4, 64, 64, device="cuda", generator=g), torch.tensor(500, device="cuda"),
                torch.randn(b, 77, 768, device="cuda", generator=g))  # fmt: skip

    def seconds(fn: Callable[[], object]) -> float:
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        return time.perf_counter() - t

    def train() -> None:
        x, t, e = inputs(2)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            pred = unet(x, t, encoder_hidden_states=e).sample
        pred.float().pow(2).mean().backward()
        unet.zero_grad(set_to_none=True)

    def forward(b: int) -> torch.Tensor:
        x, t, e = inputs(b)
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            return unet(x, t, encoder_hidden_states=e).sample

    result: dict[str, float | str] = {"mode": mode, "first_train_s": seconds(train)}
    for b in (4, 20, 64):
        result[f"first_forward_b{b}_s"] = seconds(lambda b=b: forward(b))
    result["train_step_ms"] = 1000 * statistics.median(seconds(train) for _ in range(10))
    result["forward_b64_ms"] = 1000 * statistics.median(seconds(lambda: forward(64)) for _ in range(8))
    g.manual_seed(7)
    torch.save(forward(4)[:2].float().cpu(), out)  # two of the four latents
    return result


def markdown_table(report: dict) -> str:
    """The result as a Markdown table (seconds for first uses, milliseconds after), with its header line."""
    names = {"cudnn_on": "cuDNN attention on (PyTorch's default)", "cudnn_off": "cuDNN attention off"}
    lines = [
        f"{report['device']}, torch {report['versions']['torch']}, diffusers {report['versions']['diffusers']}; "
        "SD1.5 UNet, fp32 weights under bf16 autocast, fresh process per row:",
        "",
        "| attention | first training step (s) | first forward, batch 4 / 20 / 64 (s) | training step (ms) "
        "| forward, batch 64 (ms) |",
        "|---|---:|---:|---:|---:|",
    ]
    for mode, row in report["modes"].items():
        firsts = " / ".join(f"{row[f'first_forward_b{b}_s']:.2f}" for b in (4, 20, 64))
        lines.append(f"| {names[mode]} | {row['first_train_s']:.1f} | {firsts} | {row['train_step_ms']:.0f} "
                     f"| {row['forward_b64_ms']:.0f} |")  # fmt: skip
    diff = report["output_diff"]
    lines += ["", f"Outputs of the two at batch 4: mean |diff| {diff['mean_abs']:.4f}, max {diff['max_abs']:.4f} "
              f"(mean |output| {diff['mean_abs_output']:.3f})."]  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)  # one mode, in a child process
    parser.add_argument("--tensor", type=Path, help=argparse.SUPPRESS)
    add_report_arguments(parser)
    args = parser.parse_args(argv)
    if printed_table(args, markdown_table):
        return 0
    if args.mode:
        print(json.dumps(measure(args.mode, args.tensor)), flush=True)
        return 0
    import torch

    if not torch.cuda.is_available():
        parser.error("needs CUDA")
    import diffusers

    report: dict[str, object] = {
        "benchmark": "attention_first_use", "device": torch.cuda.get_device_name(0),
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__}, "modes": {},
    }  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        for mode in MODES:
            child = [sys.executable, "-m", "benchmarks.attention_first_use", "--mode", mode,
                     "--tensor", f"{tmp}/{mode}.pt"]  # fmt: skip
            done = subprocess.run(child, capture_output=True, text=True, check=True)
            report["modes"][mode] = json.loads(done.stdout.strip().splitlines()[-1])
            print(report["modes"][mode], flush=True)
        on, off = (torch.load(f"{tmp}/{m}.pt", weights_only=True) for m in MODES)
    report["output_diff"] = {"max_abs": float((on - off).abs().max()), "mean_abs": float((on - off).abs().mean()),
                             "mean_abs_output": float(on.abs().mean())}  # fmt: skip
    print(report["output_diff"])
    write_report(args.out, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
