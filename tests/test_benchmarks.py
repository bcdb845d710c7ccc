"""The scaling benchmark (benchmarks/multi_gpu.py) on the tiny default over CPU processes (gloo): it runs the
stages' class-image sharding and the training loop under `accelerate launch`, checks that every class image is
written once, and reports each throughput against the single-process run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import PROJECT_ROOT

pytestmark = pytest.mark.slow


def test_scaling_benchmark_on_two_cpu_processes(tmp_path: Path) -> None:
    out = tmp_path / "scaling.json"
    cmd = [sys.executable, "-m", "benchmarks.multi_gpu", "--model", "tiny", "--processes", "1", "2",
           "--class-images", "4", "--sample-batch-size", "2", "--sample-steps", "2", "--global-batch", "1", "2",
           "--steps", "2", "--warmup", "1", "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(out.read_text())
    assert {n: run["processes"] for n, run in results["runs"].items()} == {"1": 1, "2": 2}
    assert results["runs"]["2"]["class_images"]["images_per_process"] == [2.0, 2.0]  # each index once
    scaling = results["scaling"]
    assert set(scaling) == {
        "class_images",
        "dreambooth_g1",
        "dreambooth_g2",
        "lora_r4_g1",
        "lora_r4_g2",
        "dreambooth_b1_per_process",
        "lora_r4_b1_per_process",
    }
    for name, row in scaling.items():
        assert row["n1_speedup"] == 1.0 and row["n1_rate"] > 0, name
    for name in ("class_images", "dreambooth_g2", "lora_r4_g2", "dreambooth_b1_per_process"):
        row = scaling[name]
        assert row["n2_rate"] > 0 and row["n2_efficiency"] == pytest.approx(row["n2_speedup"] / 2), name
    assert "dreambooth_g1" in results["runs"]["1"]["training"]
    assert "dreambooth_g1" not in results["runs"]["2"]["training"]  # a global batch of 1 cannot be split in 2


@pytest.mark.parametrize(
    "specs",
    [[["a", "x=1"], ["a"]], [["base", "dreambooth.seed=1"]], [["dreambooth.seed=1"]]],
    ids=["twice", "base", "no-name"],
)
def test_dreambooth_sweep_refuses_variants_it_would_mix_up(specs: list[list[str]]) -> None:
    """A repeated name, the base row's name, or an override where the name belongs would silently drop or
    mislabel a variant: the benchmark stops naming it."""
    from benchmarks.dreambooth_sweep import parse_variants

    with pytest.raises(SystemExit, match="give each variant a unique name other than 'base'"):
        parse_variants(specs)
    assert parse_variants([["a", "x=1"], ["b"]]) == {"a": ["x=1"], "b": []}


def test_speed_benchmark_on_the_tiny_model_checks_and_tables(tmp_path: Path) -> None:
    """benchmarks/speed.py end to end on the CPU: every comparison gives rates for both sides and a ratio per
    round, the numerical checks compare the default path with the eager one (identical on the CPU, where no
    lever applies), and --table renders the README's table from the JSON."""
    out = tmp_path / "speed.json"
    cmd = [sys.executable, "-m", "benchmarks.speed", "--model", "tiny", "--device", "cpu", "--repeats", "2",
           "--steps", "2", "--warmup", "1", "--check-steps", "3", "--sample-images", "5", "--plain-batches", "5",
           "--only", "check", "dreambooth", "lora_r4", "infer", "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(out.read_text())
    for name in ("dreambooth", "lora_r4", "infer"):
        row = results[name]
        assert len(row["plain"]["runs"]) == len(row["project"]["runs"]) == len(row["ratio"]["runs"]) == 2, (
            name
        )
        assert row["plain"]["median"] > 0 and row["project"]["median"] > 0, name
        assert row["ratio"]["min"] <= row["ratio"]["median"] <= row["ratio"]["max"], name
    assert results["dreambooth"]["graph_blocker"] == "the device is cpu"
    check = results["check_dreambooth"]
    assert check["first_loss_rel_diff"] == 0.0 and check["weights_diff_over_update"] == 0.0, check
    assert check["weights_update_norm_eager"] > 0
    assert results["infer"]["images"] == 5 and results["infer"]["check_max_abs_diff"] <= 1 / 255 + 1e-6
    table = subprocess.run([sys.executable, "-m", "benchmarks.speed", "--table", str(out)], cwd=PROJECT_ROOT,
                           capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert (
        "| DreamBooth step (batch 1 + 1 prior) |" in table
        and "| infer (30 steps, CFG 7.5, 5 prompts) |" in table
    )
    assert f"**{results['lora_r4']['ratio']['median']:.2f}x**" in table


def test_sampling_profile_times_each_side_on_the_tiny_model(tmp_path: Path) -> None:
    from benchmarks import sampling_profile

    out = tmp_path / "sampling.json"
    results = sampling_profile.main(
        ["--model", "tiny", "--device", "cpu", "--rounds", "1", "--images-per-prompt", "1", "--steps", "2",
         "--out", str(out)]
    )  # fmt: skip
    assert json.loads(out.read_text()) == results and results["images"] == 5
    sides = results["sides"]
    assert set(sides) == {"plain", "plain_latents_only", "project_no_files", "project_with_pngs"}
    assert all(row["median_s"] > 0 and len(row["runs"]) == 1 for row in sides.values())


def test_sampler_kernel_benchmark_on_the_tiny_model(tmp_path: Path) -> None:
    from benchmarks import sampler_kernels

    out = tmp_path / "kernels.json"
    argv = ["--model", "tiny", "--modes", "nhwc", "--batch", "4", "--repeats", "2", "--calls", "1"]
    assert sampler_kernels.main([*argv, "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert set(report["steady"]) == set(report["first_use"]) == {"eager", "nhwc"}
    assert report["first_use_cached"] == {}  # nothing compiled
    for row in report["steady"].values():
        assert len(row["calls_s"]) == 2 and row["ms_median"] > 0
        assert row["max_abs_diff"] <= 1e-4 * max(1.0, row["mean_abs_output"])  # same UNet, another layout
    assert report["steady"]["eager"]["speedup_median"] == 1.0
    assert all(r["first_call_s"] > 0 for r in report["first_use"].values())
    table = sampler_kernels.markdown_table(report)
    assert "| nhwc |" in table and "| eager |" in table
