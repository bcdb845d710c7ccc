"""The recipe benchmark (benchmarks/recipe.py): dvc.yaml's stage commands resolved from the seed profile, and its
smoke mode run end to end on the CPU, the way a GPU host without opencv's Haar cascades runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import recipe
from stages.lib.config.loader import checked_config

from .conftest import PROJECT_ROOT


@pytest.fixture(scope="module")
def seed_params(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """profile=seed_hw4 with tracking off, composed from conf/ like the benchmark does."""
    return recipe.read_params(recipe.compose_params(tmp_path_factory.mktemp("params") / "seed_hw4.yaml"))


def test_stage_commands_are_dvc_yamls_resolved(seed_params: dict) -> None:
    commands = recipe.stage_commands(seed_params, recipe.RECIPE_STAGES, PROJECT_ROOT / "dvc.yaml")
    keys = [c.key for c in commands]
    assert keys == ["sample_subject", "base", "prep", "class_images", "dreambooth", "lora@4", "lora@8",
                    "lora@24", "convert", "infer", "compare"]  # fmt: skip
    by_key = {c.key: c for c in commands}
    assert by_key["prep"].argv[:6] == ["python", "-m", "stages", "prep", "--input", "data/sample_subject"]
    assert "models/lora/r24" in by_key["lora@24"].outs and "--rank" in by_key["lora@24"].argv
    assert "models/export/lora_extracted/r32" in by_key["infer"].argv
    assert by_key["dreambooth"].metrics == ["reports/dreambooth/metrics.json"]
    no_haar = recipe.launcher(by_key["prep"], haar=False)
    assert no_haar[:4] == [sys.executable, "-m", "benchmarks.recipe", recipe.WITHOUT_HAAR]
    assert recipe.launcher(by_key["dreambooth"], haar=False)[1:4] == ["-m", "stages", "dreambooth"]


def test_scale_multiplies_counts_and_steps_only(seed_params: dict) -> None:
    args = recipe.parse_args(["--scale", "0.1", "--set", "infer.seed=3", "dreambooth.seed=5"])
    params, changes = recipe.benchmark_params(seed_params, args)
    assert params["class_images"]["num_class_images"] == 50
    assert params["dreambooth"]["max_train_steps"] == 80
    assert params["lora"]["train"]["max_train_steps"] is None, "left null: LoRA inherits DreamBooth's"
    assert checked_config(params, "benchmark params").lora.train.max_train_steps == 80
    assert params["dreambooth"]["validation_steps"] == 20
    assert (
        params["class_images"]["num_inference_steps"] == 50 and params["infer"]["num_inference_steps"] == 30
    )
    assert params["model"] == {**seed_params["model"], "source": "single_file", "path": recipe.SD15_FILE}
    assert changes["infer.seed"] == 3 and params["tracking"]["enabled"] is False
    assert params["dreambooth"]["seed"] == 5, "one --set takes several values"
    with pytest.raises(SystemExit, match="unknown params key 'infer.sed'"):
        recipe.benchmark_params(seed_params, recipe.parse_args(["--set", "infer.sed=3"]))


# The smallest run of every recipe stage but the optional convert / compare: one rank, two training steps, one
# class image, one prompt on two variants, no validation images.
SMOKE_SETS = ["lora.ranks=[4]", "lora.rank=4", "infer.variants=[dreambooth,lora]",
              "infer.prompts=[a photo of sks man face]", "infer.class_prompt_images=0",
              "dreambooth.num_validation_images=0", "lora.train.num_validation_images=0"]  # fmt: skip


@pytest.mark.slow
def test_smoke_run_times_every_stage_and_writes_outputs(tmp_path: Path) -> None:
    """The tiny random model through the stages: every stage's time, metrics and outputs land in the JSON; prep
    runs as on a host without opencv's Haar cascades (saliency / centre crops)."""
    out, work = tmp_path / "recipe.json", tmp_path / "work"
    cmd = [sys.executable, "-m", "benchmarks.recipe", "--tiny", "--scale", "0.002", "--device", "cpu",
           "--work", str(work), "--out", str(out), "--params", str(tmp_path / "params.yaml"),
           "--leave-out", "convert", "compare", "--force-no-haar"]  # fmt: skip
    cmd += [arg for item in SMOKE_SETS for arg in ("--set", item)]
    env = dict(
        os.environ, SDPIPE_GIT_COMMIT="c0ffee" * 6 + "0000"
    )  # the tree's commit, given where git is stale
    proc = subprocess.run(cmd, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["git_commit"] == env["SDPIPE_GIT_COMMIT"]
    stages = report["stages"]
    assert list(stages) == ["sample_subject", "base", "prep", "class_images", "dreambooth", "lora@4", "infer"]
    assert all(
        s["returncode"] == 0 and s["seconds"] > 0 and not s["missing_outputs"] for s in stages.values()
    )
    assert report["complete"] is True
    assert report["total_seconds"] == pytest.approx(sum(s["seconds"] for s in stages.values()))
    assert report["scale"] == 0.002 and report["config"]["dreambooth"]["max_train_steps"] == 2
    assert stages["prep"]["metrics"]["num_face"] == 0 and report["face_detection"].startswith("none")
    assert (
        stages["dreambooth"]["metrics"]["steps_per_s"] > 0 and stages["infer"]["metrics"]["images_per_s"] > 0
    )
    assert stages["class_images"]["metrics"]["num_images"] == 1
    for name in ("models/base", "models/dreambooth", "models/lora/r4", "data/prepared", "data/infer"):
        assert (work / name).is_dir() and stages_output(stages, name) > 0, name
    assert "lora@4" in proc.stdout and "total" in proc.stdout


def stages_output(stages: dict, path: str) -> float:
    """The size the report gives the output ``path`` (MB), whichever stage wrote it."""
    return next(s["outputs_mb"][path] for s in stages.values() if path in s["outputs_mb"])


def test_compare_is_left_out_with_its_reason_where_opencv_lacks_hog(monkeypatch: pytest.MonkeyPatch) -> None:
    import cv2

    args = recipe.parse_args(["--leave-out", "convert"])
    assert recipe.left_out_stages(args) == {"convert": "--leave-out"}, "this OpenCV has HOGDescriptor"
    monkeypatch.delattr(cv2, "HOGDescriptor")
    assert recipe.left_out_stages(args) == {
        "convert": "--leave-out",
        "compare": f"opencv {cv2.__version__} has no HOGDescriptor",
    }
    asked = recipe.parse_args(["--leave-out", "compare"])
    assert recipe.left_out_stages(asked) == {"compare": "--leave-out"}
