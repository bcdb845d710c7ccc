"""Stage `convert` on a tiny trained world: every export reloaded by the loaders that other tools (and plain
diffusers) use, and compared with the model it came from."""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml
from diffusers import StableDiffusionPipeline
from mlflow.tracking import MlflowClient
from safetensors import safe_open
from safetensors.torch import load_file

from stages import convert, dreambooth, lora
from stages.base import file_sha256
from stages.compose import compose
from stages.lib.config.schema import PipelineConfig
from stages.lib.errors import StageError
from stages.lib.layout import LORA_WEIGHT_NAME
from stages.lib.models.export_checks import moved_towards, text_encoder_changed, unet_probe
from stages.lib.models.loading import load_pipeline
from stages.lib.models.lora_extract import extract_lora, save_extracted, target_linears
from stages.lib.models.lora_formats import (
    BIN_WEIGHT,
    kohya_to_diffusers,
    split_diffusers_key,
)
from stages.lib.models.single_file import load_single_file

from .conftest import PROJECT_ROOT
from .test_single_file import write_config_dir
from .training_fixtures import RES, TinyWorld, new_world, tiny_training_cfg

RANKS, FEATURED, STEPS = [2, 4], 4, 4
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """On a shared 2-core machine torch's second thread spin-waits for a busy core: ops on these tiny
    tensors ran 10-100x slower with 2 threads than with 1 while other processes were running."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> TinyWorld:
    """Base, DreamBooth and LoRAs of ranks 2 and 4, each trained for a few steps."""
    world = new_world(tmp_path_factory, "convert")
    root, cfg = world.root, world.cfg
    tiny_training_cfg(cfg, steps=STEPS)
    for train in (cfg.dreambooth, cfg.lora.train):
        train.num_validation_images = 0
    cfg.lora.ranks, cfg.lora.rank = list(RANKS), FEATURED
    cfg.convert.single_file_dtype = "float32"  # bit-exact reloads; float16 only rounds
    dreambooth.run(cfg, world.base_dir, root / "models" / "dreambooth", world.paths("dreambooth"))
    for rank in RANKS:
        out = root / "models" / "lora" / f"r{rank}"
        lora.run(cfg, rank, root / "models" / "dreambooth", out, world.paths(f"lora_r{rank}"))
    cfg.tracking.enabled = True
    cfg.tracking.uri = f"sqlite:///{root / 'mlflow.db'}"
    return world


def run_convert(world: TinyWorld, cfg: PipelineConfig | None = None, out: str = "export") -> dict[str, float]:
    models, reports = world.root / "models", world.root / "reports" / out
    return convert.run(
        cfg or world.cfg, world.base_dir, models / "dreambooth", models / "lora", models / out, reports
    )


@pytest.fixture(scope="module")
def export(world: TinyWorld) -> tuple[Path, dict[str, float]]:
    return world.root / "models" / "export", run_convert(world)


@pytest.fixture(scope="module")
def db_pipe(world: TinyWorld) -> StableDiffusionPipeline:
    return load_pipeline(world.root / "models" / "dreambooth")


@pytest.fixture(scope="module")
def base_pipe(world: TinyWorld) -> StableDiffusionPipeline:
    return load_pipeline(world.base_dir)


def latents(pipe: StableDiffusionPipeline, prompt: str = "a photo of sks man face") -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    kwargs = {"num_inference_steps": 3, "height": RES, "width": RES, "output_type": "latent"}
    return pipe(prompt, generator=generator, **kwargs).images


def latents_with_lora(pipe: StableDiffusionPipeline, source: Path, **kwargs: str) -> torch.Tensor:
    pipe.load_lora_weights(str(source), **kwargs)
    try:
        return latents(pipe)
    finally:
        pipe.unload_lora_weights()


def lora_source(world: TinyWorld, rank: int) -> Path:
    return world.root / "models" / "lora" / f"r{rank}" / LORA_WEIGHT_NAME


def tiny_config_dir(pipe: StableDiffusionPipeline, dest: Path) -> Path:
    parts = {"unet": pipe.unet, "vae": pipe.vae, "text_encoder": pipe.text_encoder}
    return write_config_dir(dest, parts)


# ------------------------------------------------------------------------------------------------ LoRAs


def test_bin_round_trip_is_exact_and_plain_diffusers_loads_it(world, export, db_pipe) -> None:
    out, metrics = export
    for rank in RANKS:
        assert metrics[f"bin_r{rank}_max_abs_diff"] == 0.0 and metrics[f"bin_r{rank}_output_diff"] == 0.0
        source = load_file(lora_source(world, rank))
        copy_ = torch.load(out / "lora" / f"r{rank}" / BIN_WEIGHT, weights_only=True)
        assert copy_.keys() == source.keys() and all(torch.equal(copy_[k], v) for k, v in source.items())
    plain = latents(db_pipe)
    reference = latents_with_lora(db_pipe, lora_source(world, FEATURED).parent)
    from_bin = latents_with_lora(db_pipe, out / "lora" / f"r{FEATURED}", weight_name=BIN_WEIGHT)
    assert not torch.allclose(reference, plain, atol=1e-6), "the LoRA must change the output"
    assert torch.equal(from_bin, reference)


def test_kohya_file_is_detected_and_loaded_by_diffusers_own_loader(world, export, db_pipe) -> None:
    out, metrics = export
    path = out / "lora" / f"r{FEATURED}" / f"sks_r{FEATURED}_kohya.safetensors"
    tensors = load_file(path)
    assert all(key.startswith("lora_unet_") for key in tensors)
    assert (
        "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_out_0.lora_down.weight" in tensors
    )
    assert {t.item() for k, t in tensors.items() if k.endswith(".alpha")} == {float(FEATURED)}
    _, alphas = StableDiffusionPipeline.lora_state_dict(str(path))
    assert alphas, "diffusers converts kohya files and returns their alphas"
    source = load_file(lora_source(world, FEATURED))
    back = kohya_to_diffusers(tensors, {split_diffusers_key(k)[0] for k in source})
    assert back.keys() == source.keys() and all(torch.equal(back[k], v) for k, v in source.items())
    reference = latents_with_lora(db_pipe, lora_source(world, FEATURED).parent)
    assert torch.allclose(latents_with_lora(db_pipe, path), reference, atol=1e-5)
    assert metrics[f"kohya_r{FEATURED}_output_diff"] < 1e-5


def test_kohya_header_carries_training_metadata(world, export) -> None:
    out, _ = export
    path = out / "lora" / f"r{FEATURED}" / f"sks_r{FEATURED}_kohya.safetensors"
    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata()
    train = world.cfg.lora.train
    expected = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(FEATURED),
        "ss_network_alpha": str(FEATURED),
        "ss_learning_rate": str(train.learning_rate),
        "ss_max_train_steps": str(STEPS),
        "ss_steps": str(STEPS),
        "ss_seed": str(train.seed),
        "ss_sd_model_name": "tiny",
        "ss_new_sd_model_hash": file_sha256(world.base_dir / "unet" / "diffusion_pytorch_model.safetensors"),
        "ss_output_name": f"sks_r{FEATURED}",
        "sdp_instance_prompt": world.cfg.data.instance_prompt,
        "sdp_class_prompt": world.cfg.data.class_prompt,
    }
    assert {k: meta.get(k) for k in expected} == expected
    assert len(meta["sdp_git_commit"]) == 40
    blob = path.read_bytes()
    data = blob[8 + int.from_bytes(blob[:8], "little") :]
    assert meta["sshs_model_hash"] == hashlib.sha256(data).hexdigest()  # what A1111 shows as the LoRA's hash


# ----------------------------------------------------------------------------------------- single files


def test_single_file_reloads_with_identical_weights_and_outputs(export, db_pipe, tmp_path) -> None:
    out, metrics = export
    pipe = load_single_file(out / convert.SINGLE_FILE, config_dir=tiny_config_dir(db_pipe, tmp_path / "cfg"))
    expected = db_pipe.unet.state_dict()
    got = pipe.unet.state_dict()
    assert got.keys() == expected.keys() and all(torch.equal(got[k], v) for k, v in expected.items())
    assert torch.allclose(latents(pipe), latents(db_pipe), atol=1e-6)
    assert metrics["single_file_max_abs_diff"] == 0.0
    with safe_open(str(out / convert.SINGLE_FILE), framework="pt") as handle:
        assert handle.metadata()["sdp_instance_prompt"] == "a photo of sks man face"


def test_half_precision_single_file_rounds_only(world) -> None:
    cfg = copy.deepcopy(world.cfg)
    cfg.convert.single_file_dtype = "float16"
    cfg.convert.bin = cfg.convert.kohya = cfg.convert.merged = False
    cfg.convert.extract_rank = 0
    metrics = run_convert(world, cfg, out="export_fp16")
    path = world.root / "models" / "export_fp16" / convert.SINGLE_FILE
    with safe_open(str(path), framework="pt") as handle:
        dtypes = {handle.get_slice(key).get_dtype() for key in handle.keys()}
    assert dtypes == {"F16", "I64"}  # I64: the text encoder's position ids
    assert metrics["single_file_max_abs_diff"] == 0.0  # equal to the DreamBooth weights rounded to fp16
    assert 0 < metrics["single_file_output_diff"] < 1e-2


def test_merged_single_file_equals_dreambooth_plus_lora(world, export, db_pipe, tmp_path) -> None:
    out, metrics = export
    path = out / f"merged_r{FEATURED}.safetensors"
    merged = load_single_file(path, config_dir=tiny_config_dir(db_pipe, tmp_path / "cfg"))
    reference = latents_with_lora(db_pipe, lora_source(world, FEATURED).parent)
    assert torch.allclose(latents(merged), reference, atol=1e-5)
    assert metrics["merged_output_diff"] < 1e-5


# ----------------------------------------------------------------------------------------- extraction


def test_extraction_error_falls_with_rank_and_vanishes_at_full_rank(base_pipe, db_pipe) -> None:
    errors = [extract_lora(base_pipe.unet, db_pipe.unet, TARGETS, r).relative_error for r in (1, 2, 4, 8, 64)]
    assert errors == sorted(errors, reverse=True) and errors[0] > 0.3, errors
    assert errors[-1] < 1e-5  # 64 >= every projection's full rank in the tiny UNet


def test_extracted_lora_moves_base_outputs_towards_dreambooth(world, export, base_pipe, db_pipe) -> None:
    out, metrics = export
    before, target = latents(base_pipe), latents(db_pipe)
    after = latents_with_lora(base_pipe, out / "lora_extracted" / f"r{world.cfg.convert.extract_rank}")
    assert moved_towards(before, after, target) < 1.0
    assert metrics["extract_output_ratio"] < 1.0 and 0 < metrics["extract_rel_error"] < 1
    assert metrics["extract_text_encoder_left_out"] == 0.0  # this DreamBooth trained the UNet only


def test_a_trained_text_encoder_is_reported_as_left_out_of_the_extraction(base_pipe) -> None:
    tuned = copy.deepcopy(base_pipe.text_encoder)
    assert not text_encoder_changed(base_pipe.text_encoder, tuned)
    with torch.no_grad():
        tuned.get_input_embeddings().weight[42] += 0.01  # e.g. the identifier token's embedding
    assert text_encoder_changed(base_pipe.text_encoder, tuned)


def test_extraction_of_an_attention_only_delta_reproduces_the_tuned_model(base_pipe, tmp_path) -> None:
    """DreamBooth also changes convolutions and norms; on a delta inside the target projections only, a
    full-rank extraction loaded through diffusers gives the tuned model's output."""
    base, tuned = base_pipe, copy.deepcopy(base_pipe.unet)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in target_linears(tuned, TARGETS).values():
            module.weight += 0.05 * torch.randn(module.weight.shape, generator=generator)
    target, before = unet_probe(tuned), unet_probe(base.unet)
    ratios = []
    for rank in (2, 64):
        folder = tmp_path / f"r{rank}"
        save_extracted(extract_lora(base.unet, tuned, TARGETS, rank), folder)
        base.load_lora_weights(str(folder))
        ratios.append(moved_towards(before, unet_probe(base.unet), target))
        base.unload_lora_weights()
    assert ratios[1] < 1e-4 < ratios[0] < 1.0, ratios


# ------------------------------------------------------------------------------------- errors, tracking


def test_missing_rank_untrained_featured_rank_and_bad_dtype_are_clear_errors(world) -> None:
    cfg = copy.deepcopy(world.cfg)
    cfg.lora.ranks = [*RANKS, 8]
    with pytest.raises(StageError, match=r"r8/pytorch_lora_weights\.safetensors \(dvc repro lora@8\)"):
        run_convert(world, cfg)
    cfg.lora.ranks, cfg.lora.rank = list(RANKS), 16
    with pytest.raises(StageError, match=r"lora\.rank=16 is not trained"):
        run_convert(world, cfg)
    cfg.lora.rank, cfg.convert.single_file_dtype = FEATURED, "fp8"
    with pytest.raises(StageError, match="convert.single_file_dtype='fp8'"):
        run_convert(world, cfg)


def test_failed_run_keeps_the_previous_export(world, export, monkeypatch) -> None:
    out, _ = export
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(convert, "save_extracted", broken)
    cfg = copy.deepcopy(world.cfg)
    cfg.convert.single_file = cfg.convert.merged = cfg.convert.bin = cfg.convert.kohya = False
    with pytest.raises(OSError, match="disk full"):
        run_convert(world, cfg)
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert not list(out.parent.glob(".export.*"))


def test_run_is_tracked_in_mlflow(world, export) -> None:
    client = MlflowClient(world.cfg.tracking.uri)
    experiment = client.get_experiment_by_name(world.cfg.tracking.experiment_name)
    runs = client.search_runs([experiment.experiment_id], "tags.stage = 'convert'")
    params = runs[-1].data.params  # the first convert run: the fixture's
    assert params["convert.extract_rank"] == str(world.cfg.convert.extract_rank)
    assert params["lora.ranks"] == "2,4" and params["lora.rank"] == str(FEATURED)
    assert runs[-1].data.metrics["bin_r4_max_abs_diff"] == 0.0


def test_cli_reports_bad_input_with_exit_status_2(world, tmp_path, capsys) -> None:
    params = tmp_path / "params.yaml"
    data = yaml.safe_load(compose(params, [], root=PROJECT_ROOT).read_text())
    data["lora"].update(ranks=RANKS, rank=FEATURED)
    data["tracking"]["enabled"] = False
    params.write_text(yaml.safe_dump(data))
    args = ["--params", str(params), "--base", str(world.base_dir), "--lora-root", str(tmp_path / "none")]
    assert convert.main([*args, "--out", str(tmp_path / "out"), "--reports", str(tmp_path / "r")]) == 2
    assert "dvc repro lora@2" in capsys.readouterr().err
