"""Stage `base`: the tiny default is deterministic and saved in plain diffusers format; bad sources fail clearly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import load_file
from transformers import CLIPTextModel

from stages import __main__ as stages_main
from stages import base
from stages.lib.config.schema import ModelConfig, PipelineConfig
from stages.lib.models.base_source import load_base_source
from stages.lib.models.loading import ModelLoadError, load_pipeline
from stages.lib.tracking.sidecar import take_prestarted

UNET = "unet/diffusion_pytorch_model.safetensors"


def test_tiny_base_is_deterministic_and_loads_with_plain_diffusers(
    tiny_cfg: PipelineConfig, tmp_path: Path
) -> None:
    metrics = base.run(tiny_cfg, tmp_path / "a", tmp_path / "reports")
    base.run(tiny_cfg, tmp_path / "b", tmp_path / "reports_b")
    a, b = load_file(tmp_path / "a" / UNET), load_file(tmp_path / "b" / UNET)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert metrics["unet_params_M"] > 0.1
    assert (
        json.loads((tmp_path / "reports" / "metrics.json").read_text())["unet_params_M"]
        == metrics["unet_params_M"]
    )
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "a")
    assert isinstance(pipe.unet, UNet2DConditionModel) and pipe.unet.config.cross_attention_dim == 32
    assert isinstance(pipe.vae, AutoencoderKL) and isinstance(pipe.text_encoder, CLIPTextModel)
    assert len(pipe.tokenizer) == 49408
    assert pipe.tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    image = pipe("a photo of man face", num_inference_steps=2, height=64, width=64).images[0]
    assert image.size == (64, 64)
    assert json.loads((tmp_path / "a" / base.SOURCE_FILE).read_text())["source"] == "tiny"


def test_other_seed_gives_other_weights(tiny_cfg: PipelineConfig, tmp_path: Path) -> None:
    base.run(tiny_cfg, tmp_path / "a", tmp_path / "r")
    tiny_cfg.model.tiny.seed = 1
    base.run(tiny_cfg, tmp_path / "b", tmp_path / "r")
    a, b = load_file(tmp_path / "a" / UNET), load_file(tmp_path / "b" / UNET)
    assert not all(torch.equal(a[k], b[k]) for k in a)


def test_folder_source_round_trips(tiny_cfg: PipelineConfig, tmp_path: Path) -> None:
    base.run(tiny_cfg, tmp_path / "tiny", tmp_path / "r")
    tiny_cfg.model = ModelConfig(source="folder", path=str(tmp_path / "tiny"))
    base.run(tiny_cfg, tmp_path / "copy", tmp_path / "r")
    a, b = load_file(tmp_path / "tiny" / UNET), load_file(tmp_path / "copy" / UNET)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    ("model", "message"),
    [
        (ModelConfig(source="nope"), "model.source='nope' is not one of"),
        (ModelConfig(source="folder", path=""), "needs model.path"),
        (ModelConfig(source="folder", path="/no/such/folder"), "model_index.json missing"),
        (ModelConfig(source="hub", path="org/model", revision=""), "pinned model.revision"),
        (
            ModelConfig(source="hub", path="org/not-cached", revision="abc"),
            "not in the local Hugging Face cache",
        ),
    ],
)
def test_bad_sources_fail_with_clear_message(model: ModelConfig, message: str, tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=message):
        load_base_source(model, tmp_path)


def test_failed_base_run_keeps_previous_output(tiny_cfg: PipelineConfig, tmp_path: Path) -> None:
    out = tmp_path / "base"
    base.run(tiny_cfg, out, tmp_path / "r")
    before = (out / UNET).read_bytes()
    tiny_cfg.model = ModelConfig(source="folder", path=str(tmp_path / "missing"))
    with pytest.raises(ModelLoadError):
        base.run(tiny_cfg, out, tmp_path / "r")
    assert (out / UNET).read_bytes() == before


def test_stage_cli_prints_one_line_error(tiny_params: Path, tmp_path: Path, capsys) -> None:
    text = (
        tiny_params.read_text()
        .replace("source: tiny", "source: folder", 1)
        .replace("path: ''", "path: /nope", 1)
    )
    tiny_params.write_text(text)
    assert (
        base.main(
            ["--params", str(tiny_params), "--out", str(tmp_path / "o"), "--reports", str(tmp_path / "r")]
        )
        == 2
    )
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "/nope" in errors[0], errors
    # the same through dvc.yaml's `python -m stages base`, whose prestarted MLflow sidecar is closed, unused
    argv = [
        "base",
        "--params",
        str(tiny_params),
        "--out",
        str(tmp_path / "o"),
        "--reports",
        str(tmp_path / "r"),
    ]
    assert stages_main.main(argv) == 2 and take_prestarted() is None
    assert "/nope" in capsys.readouterr().err
    assert stages_main.main(["nope"]) == 2
    assert "takes one of base, prep, class_images" in capsys.readouterr().err


def test_the_dispatcher_launches_exactly_the_stages_that_can_spread() -> None:
    """``python -m stages`` launches early (before the stage's imports) exactly the stages whose own ``main`` passes
    ``launch_module`` to stage_main: the two lists cannot drift apart."""
    root = Path(stages_main.__file__).parent
    spreading = {
        name
        for name in stages_main.TRACKED_STAGES
        if f'launch_module="stages.{name}"' in (root / f"{name}.py").read_text()
    }
    assert spreading == stages_main.LAUNCHABLE_STAGES


def test_tiny_default_never_loads_in_half_precision(tiny_cfg: PipelineConfig, tmp_path: Path) -> None:
    """The hand-set tiny VAE needs fp32 (its colour is a small offset fp16 rounds away); other models may use fp16."""
    base.run(tiny_cfg, tmp_path / "tiny", tmp_path / "r")
    assert load_pipeline(tmp_path / "tiny", torch_dtype=torch.float16).vae.dtype == torch.float32
    tiny_cfg.model = ModelConfig(source="folder", path=str(tmp_path / "tiny"))
    base.run(tiny_cfg, tmp_path / "copy", tmp_path / "r")
    assert load_pipeline(tmp_path / "copy", torch_dtype=torch.float16).vae.dtype == torch.float16
