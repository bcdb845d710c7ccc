"""ControlNet: training through the shared loop, the generation stage's outputs and edge metrics on the tiny
default, importing a pretrained ControlNet, and the real-weights loader at full SD1.5 size."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import ControlNetModel
from mlflow.tracking import MlflowClient
from PIL import Image
from safetensors.torch import save_file

from stages import controlnet, controlnet_train, dreambooth, lora
from stages.lib.config.loader import load_config, save_params
from stages.lib.errors import StageError
from stages.lib.imaging.annotators import annotate_pixels, get_annotator
from stages.lib.metrics.edge_metrics import DEFAULT_TOLERANCE_FRACTION
from stages.lib.models.controlnet_model import (
    COND_EMBEDDING_CHANNELS,
    CONTROLNET_CONFIG_DIR,
    ControlledUNet,
    ControlNetLoadError,
    check_compatible,
    controlnet_to_original,
    load_controlnet,
)
from stages.lib.models.loading import load_pipeline
from stages.lib.training.data import encode_latents, load_instance_set
from stages.lib.training.finetune import encode_prompt
from stages.lib.training.trainer import Batch

from .conftest import PROJECT_ROOT
from .training_fixtures import RES, TinyWorld, new_world

CN_STEPS = 20
SD15_CONTROLNET_PARAMS = 361_279_120  # lllyasviel/sd-controlnet-canny


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> TinyWorld:
    w = new_world(
        tmp_path_factory, "cn", tracking_uri=f"sqlite:///{tmp_path_factory.getbasetemp() / 'cn.db'}"
    )
    w.cfg.lora.ranks, w.cfg.lora.rank = [4], 4
    w.cfg.infer.num_inference_steps = 10
    train = w.cfg.controlnet.train  # the tiny profile's, made as quick as the other training tests
    train.max_train_steps, train.validation_steps, train.checkpointing_steps = CN_STEPS, CN_STEPS, 10
    # class pairs as on real weights (interpolated from dreambooth); the tiny profile trains without them
    train.with_prior_preservation = True
    train.num_validation_images, train.validation_inference_steps, train.optimizer = 1, 2, "adamw"
    db = w.root / "models" / "dreambooth"
    dreambooth.run(w.cfg, w.base_dir, db, w.paths("dreambooth"))
    lora.run(w.cfg, 4, db, w.root / "models" / "lora" / "r4", w.paths("lora_r4"))
    return w


@pytest.fixture(scope="module")
def trained(world: TinyWorld) -> tuple[Path, dict[str, float]]:
    """Trained on the base UNet like dvc.yaml's stage; the generation tests use it with the DreamBooth UNet."""
    out = world.root / "models" / "controlnet"
    metrics = controlnet_train.run(world.cfg, world.base_dir, out, world.paths("controlnet"))
    return out, metrics


def control_paths(world: TinyWorld, controlnet_dir: Path, reports: Path) -> controlnet.ControlPaths:
    """The world's DreamBooth model, LoRAs and prepared photos with ``controlnet_dir``, reporting to ``reports``."""
    models = world.root / "models"
    return controlnet.ControlPaths(
        models / "dreambooth", models / "lora", controlnet_dir, world.prepared, reports
    )


@pytest.fixture(scope="module")
def generated(world: TinyWorld, trained) -> tuple[Path, dict[str, float]]:
    reports = world.root / "reports" / "controlnet"
    return reports, controlnet.run(world.cfg, control_paths(world, trained[0], reports))


def test_controlnet_trains_through_the_shared_loop_and_saves_a_diffusers_folder(world, trained) -> None:
    out, metrics = trained
    assert metrics["steps"] == CN_STEPS and metrics["pretrained"] == 0.0
    assert np.isfinite(metrics["final_loss"]) and "final_prior_loss" in metrics  # class pairs trained too
    reports = world.paths("controlnet").reports_dir
    assert (reports / "loss.csv").read_text().count("\n") == CN_STEPS + 1
    assert (reports / "validation" / f"step-{CN_STEPS:06d}.png").is_file()
    net = ControlNetModel.from_pretrained(out)  # plain diffusers
    vae_scale = 2 ** (len(load_pipeline(world.base_dir).vae.config.block_out_channels) - 1)
    n = vae_scale.bit_length()  # one stride-2 conv of the conditioning embedding per halving of the VAE
    assert list(net.config.conditioning_embedding_out_channels) == list(COND_EMBEDDING_CHANNELS[:n])
    check_compatible(net, load_pipeline(world.base_dir).unet, "tiny")


@torch.no_grad()
def test_trained_controlnet_steers_the_unet_by_its_map(world, trained) -> None:
    """Zero-initialised, an untrained ControlNet changes nothing; trained, its map changes the prediction."""
    pipe = load_pipeline(world.root / "models" / "dreambooth")
    images = load_instance_set(world.prepared, RES)
    latents = encode_latents(pipe.vae, images).mean[:2] * pipe.vae.config.scaling_factor
    maps = annotate_pixels(images.pixels[:2], get_annotator("canny", 100, 200))
    embeds = encode_prompt(pipe, world.cfg.data.instance_prompt).expand(2, -1, -1)
    t = torch.tensor([500, 500])
    noisy = latents + torch.randn(latents.shape, generator=torch.Generator().manual_seed(0))
    plain = pipe.unet(noisy, t, embeds).sample
    steered = ControlledUNet(ControlNetModel.from_pretrained(trained[0]), pipe.unet)
    with_map = steered(noisy, t, embeds, controlnet_cond=maps).sample
    blank = steered(noisy, t, embeds, controlnet_cond=torch.zeros_like(maps)).sample
    assert (with_map - plain).abs().mean() > 1e-4 and (with_map - blank).abs().mean() > 1e-5


def test_stage_writes_a_grid_per_control_image_and_edge_metrics(world, generated) -> None:
    reports, metrics = generated
    n = min(world.cfg.controlnet.num_control_images, 6)  # the world has 6 prepared photos
    grids = sorted((reports / "grids").glob("*.png"))
    assert len(grids) == n == metrics["num_control_images"]
    with Image.open(grids[0]) as grid:
        assert grid.width == 4 * controlnet.MIN_CELL  # control map | DreamBooth | + LoRA | without ControlNet
    assert (reports / "overview.png").is_file()
    assert json.loads((reports / "metrics.json").read_text()) == pytest.approx(metrics)
    for variant in controlnet.VARIANTS:
        for key in ("f1", "precision", "recall"):
            assert 0.0 <= metrics[f"edge_{key}_{variant}"] <= 1.0
    assert metrics["edge_f1_gain"] == pytest.approx(
        metrics["edge_f1_dreambooth"] - metrics["edge_f1_without_controlnet"]
    )
    per_image = json.loads((reports / "per_image.json").read_text())
    assert len(per_image) == n and set(per_image[0]) == {"control", *controlnet.VARIANTS}
    client = MlflowClient(tracking_uri=world.cfg.tracking.uri)
    run = client.search_runs(
        [client.get_experiment_by_name(world.cfg.tracking.experiment_name).experiment_id],
        "tags.stage = 'controlnet'",
    )[0]
    assert run.data.metrics["edge_f1_dreambooth"] == pytest.approx(metrics["edge_f1_dreambooth"])
    assert {a.path for a in client.list_artifacts(run.info.run_id, "controlnet")} >= {
        "controlnet/overview.png"
    }


def test_pretrained_controlnet_is_imported_through_model_path(world, trained, tmp_path: Path) -> None:
    cfg = copy.deepcopy(world.cfg)
    cfg.controlnet.model_path = str(trained[0])
    out = tmp_path / "imported"
    metrics = controlnet_train.run(cfg, world.root / "models" / "dreambooth", out, world.paths("cn_import"))
    assert metrics["pretrained"] == 1.0
    a, b = (
        ControlNetModel.from_pretrained(trained[0]).state_dict(),
        ControlNetModel.from_pretrained(out).state_dict(),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_two_processes_train_the_controlnet_like_one_with_the_same_global_batch(
    world, tmp_path: Path
) -> None:
    """compute.num_processes=2 relaunches the stage; each process keeps its rows' maps (Batch.shard)."""

    cfg = copy.deepcopy(world.cfg)
    train = cfg.controlnet.train
    train.max_train_steps, train.checkpointing_steps, train.num_validation_images = 6, 3, 0
    train.train_batch_size = 2
    db = world.root / "models" / "dreambooth"
    controlnet_train.run(cfg, db, tmp_path / "one", world.paths("cn_one"))
    train.train_batch_size, cfg.compute.num_processes = 1, 2
    params = tmp_path / "p.yaml"
    save_params(cfg, params)
    paths = world.paths("cn_two")
    status = controlnet_train.main(["--params", str(params), "--model", str(db), "--prepared", str(world.prepared),
        "--class-images", str(world.class_dir), "--out", str(tmp_path / "two"),
        "--checkpoints", str(paths.checkpoint_dir), "--reports", str(paths.reports_dir)])  # fmt: skip
    assert status == 0
    a = ControlNetModel.from_pretrained(tmp_path / "one").state_dict()
    b = ControlNetModel.from_pretrained(tmp_path / "two").state_dict()
    start = controlnet_train.new_controlnet(load_pipeline(db), train.seed).state_dict()
    # as in test_distributed: all-reduced gradients sum in another order, so compare the whole update
    moved = sum(float((a[k] - start[k]).pow(2).sum()) for k in a) ** 0.5
    apart = sum(float((a[k] - b[k]).pow(2).sum()) for k in a) ** 0.5
    assert moved > 0 and apart < 0.01 * moved, (apart, moved)
    assert json.loads((paths.reports_dir / "metrics.json").read_text())["steps"] == 6


def test_a_controlnet_of_another_architecture_is_refused(world, trained, tmp_path: Path) -> None:
    config = dict(ControlNetModel.load_config(trained[0]))
    config["cross_attention_dim"] = 48
    ControlNetModel.from_config(config).save_pretrained(tmp_path / "other")
    cfg = copy.deepcopy(world.cfg)
    cfg.controlnet.model_path = str(tmp_path / "other")
    with pytest.raises(
        ControlNetLoadError, match=r"controlnet.model_path=.*cross_attention_dim: 48 vs UNet 32"
    ):
        controlnet_train.run(cfg, world.base_dir, tmp_path / "out", world.paths("cn_bad"))
    assert not (tmp_path / "out").exists()


def test_generation_errors_name_the_missing_piece(world, trained, tmp_path: Path) -> None:
    cfg = copy.deepcopy(world.cfg)
    cfg.lora.rank = 8
    paths = control_paths(world, trained[0], tmp_path)
    with pytest.raises(StageError, match=r"lora\.rank=8 is not trained"):
        controlnet.run(cfg, paths)
    paths.controlnet = tmp_path / "nothing"
    with pytest.raises(ControlNetLoadError, match="controlnet_train"):
        controlnet.run(world.cfg, paths)


@pytest.mark.parametrize("profile", ["tiny", "sd15", "seed_hw4"])
def test_training_settings_follow_dreambooth_with_the_controlnet_learning_rate(
    tmp_path: Path, profile
) -> None:
    from stages.compose import compose  # imports DVC, which a CUDA-only test setup may lack

    overrides = [f"profile={profile}", "dreambooth.resolution=96", "dreambooth.train_text_encoder=true"]
    cfg = load_config(compose(tmp_path / "p.yaml", overrides, root=PROJECT_ROOT))
    train = cfg.controlnet.train
    assert train.resolution == 96 and train.seed == cfg.dreambooth.seed  # interpolated from dreambooth
    assert not train.train_text_encoder  # never: only the ControlNet trains
    expected = (1e-3, 4, 600) if profile == "tiny" else (1e-5, cfg.dreambooth.train_batch_size, 800)
    assert (train.learning_rate, train.train_batch_size, train.max_train_steps) == expected
    s = cfg.controlnet
    tolerance = 0.045 if profile == "tiny" else DEFAULT_TOLERANCE_FRACTION  # tiny: one 4-px latent cell
    assert s.annotator == "canny" and s.edge_tolerance == tolerance
    assert (s.model_path, s.revision, s.control_images, s.num_control_images) == ("", "", [], 4)


def test_batch_shard_keeps_each_row_with_its_conditioning_map() -> None:
    """Two processes of a global batch (2 instance rows per process, prior rows after them): every field, the
    conditioning maps included, keeps the same rows; without maps the shard has none."""
    rows = torch.arange(8.0)  # 4 instance rows, then 4 prior rows
    batch = Batch(
        noisy=rows.view(8, 1, 1, 1).expand(8, 4, 2, 2),
        target=rows.view(8, 1, 1, 1).expand(8, 4, 2, 2),
        timesteps=rows.long(),
        embeds=rows.view(8, 1, 1).expand(8, 77, 3),
        weights=None,
        num_instance=4,
        cond=rows.view(8, 1, 1, 1).expand(8, 3, 8, 8),
    )
    for rank, expected in ((0, [0, 1, 4, 5]), (1, [2, 3, 6, 7])):
        shard = batch.shard(rank, 2)
        assert shard.num_instance == 2 and shard.timesteps.tolist() == expected
        assert shard.cond is not None and shard.cond[:, 0, 0, 0].tolist() == expected
        assert torch.equal(shard.cond[:, 0, 0, 0].long(), shard.noisy[:, 0, 0, 0].long())
    plain = dataclasses.replace(batch, cond=None)
    assert plain.shard(1, 2).cond is None and plain.shard(0, 1) is plain


@pytest.mark.parametrize(
    ("path", "revision", "message"),
    [
        ("/nowhere/cn.safetensors", "", "no such file or folder"),
        ("lllyasviel/sd-controlnet-canny", "", "pin it with controlnet.revision"),
        ("lllyasviel/sd-controlnet-canny", "0" * 40, "huggingface-cli download"),
    ],
)
def test_loader_errors_name_the_key_and_the_fix(path: str, revision: str, message: str) -> None:
    with pytest.raises(ControlNetLoadError, match=message):
        load_controlnet(path, revision)


def test_loader_rejects_files_that_are_no_controlnet(tmp_path: Path) -> None:
    (tmp_path / "folder").mkdir()
    with pytest.raises(ControlNetLoadError, match="without config.json"):
        load_controlnet(str(tmp_path / "folder"))
    (tmp_path / "x.onnx").write_bytes(b"0")
    with pytest.raises(ControlNetLoadError, match="unsupported suffix"):
        load_controlnet(str(tmp_path / "x.onnx"))
    save_file({"model.diffusion_model.x": torch.zeros(1)}, str(tmp_path / "sd.safetensors"))
    with pytest.raises(ControlNetLoadError, match="no ControlNet weights"):
        load_controlnet(str(tmp_path / "sd.safetensors"))


@pytest.mark.slow
def test_full_size_sd15_controlnet_loads_from_a_folder_and_a_single_file(tmp_path: Path) -> None:
    """Random weights in the lllyasviel/sd-controlnet-canny architecture, written both ways, read back offline."""
    torch.manual_seed(0)
    net = ControlNetModel.from_config(ControlNetModel.load_config(CONTROLNET_CONFIG_DIR))
    assert sum(p.numel() for p in net.parameters()) == SD15_CONTROLNET_PARAMS
    original = {k: v.half().contiguous() for k, v in controlnet_to_original(net).items()}
    assert (
        "control_model.input_hint_block.14.weight" in original
        and "control_model.zero_convs.11.0.weight" in original
    )
    save_file(original, str(tmp_path / "control_sd15_canny.safetensors"))
    del original
    net.to(torch.float16).save_pretrained(tmp_path / "folder")
    expected = net.state_dict()
    for path in (tmp_path / "folder", tmp_path / "control_sd15_canny.safetensors"):
        loaded = load_controlnet(str(path), torch_dtype=torch.float16)
        assert isinstance(loaded, ControlNetModel)
        assert sum(p.numel() for p in loaded.parameters()) == SD15_CONTROLNET_PARAMS
        state = loaded.state_dict()
        assert state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in expected)
        del loaded, state
