"""DreamBooth / LoRA training on the tiny default: learning, prior preservation, determinism, resume, LoRA
loading through diffusers' public API, NaN handling."""

from __future__ import annotations

import copy
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

from stages import dreambooth, lora
from stages.compose import compose
from stages.lib.config.loader import to_flat_dict
from stages.lib.errors import StageError
from stages.lib.imaging.manifest import MANIFEST, Manifest
from stages.lib.layout import LORA_WEIGHT_NAME, featured_lora_dir
from stages.lib.metrics.subject_metrics import nearest_subject_distance, sample_latents
from stages.lib.training import losses
from stages.lib.training.data import encode_latents, load_instance_set
from stages.lib.training.finetune import FinetunePaths, build_training_data
from stages.lib.training.trainer import NonFiniteLossError

from .conftest import PROJECT_ROOT
from .training_fixtures import RES, TinyWorld, new_world

UNET_WEIGHTS = "unet/diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> TinyWorld:
    return new_world(
        tmp_path_factory, "world", tracking_uri=f"sqlite:///{tmp_path_factory.getbasetemp() / 'mlflow.db'}"
    )


@pytest.fixture(scope="module")
def trained(world: TinyWorld) -> tuple[Path, dict[str, float]]:
    out = world.root / "models" / "dreambooth"
    return out, dreambooth.run(world.cfg, world.base_dir, out, world.paths("dreambooth"))


def _pipe(folder: Path) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_dreambooth_output_loads_with_plain_diffusers_and_learned_the_subject(world, trained) -> None:
    out, metrics = trained
    assert metrics["val_loss"] < 0.5 * metrics["val_loss_start"], metrics
    assert metrics["steps"] == world.cfg.dreambooth.max_train_steps
    assert (out / UNET_WEIGHTS).is_file() and (out / "model_index.json").is_file()
    subject = encode_latents(_pipe(world.base_dir).vae, load_instance_set(world.prepared, RES)).mean
    prompt = world.cfg.data.instance_prompt
    dist = {
        name: nearest_subject_distance(sample_latents(_pipe(folder), prompt, 4, 10, 0, RES), subject)
        for name, folder in {"base": world.base_dir, "dreambooth": out}.items()
    }
    assert dist["dreambooth"] < 0.7 * dist["base"], dist
    reports = world.paths("dreambooth").reports_dir
    assert (reports / "loss.csv").read_text().count("\n") == world.cfg.dreambooth.max_train_steps + 1
    assert list((reports / "validation").glob("step-*.png"))


def test_prior_preservation_keeps_class_loss_lower(world, trained) -> None:
    _, with_prior = trained
    cfg = copy.deepcopy(world.cfg)
    cfg.dreambooth.with_prior_preservation = False
    without = dreambooth.run(
        cfg, world.base_dir, world.root / "models" / "db_noprior", world.paths("db_noprior")
    )
    # the probe measures the class-prompt denoising loss with fixed noise before and after training
    assert "final_prior_loss" not in without
    assert with_prior["class_probe_loss"] < without["class_probe_loss"], (with_prior, without)


def test_same_config_and_seed_give_bit_identical_weights(world, trained) -> None:
    out, _ = trained
    again = world.root / "models" / "db_again"
    dreambooth.run(world.cfg, world.base_dir, again, world.paths("db_again"))
    a, b = load_file(out / UNET_WEIGHTS), load_file(again / UNET_WEIGHTS)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_kill_minus_9_then_rerun_resumes_and_matches_uninterrupted_run(
    world, trained, tmp_path: Path
) -> None:
    params = tmp_path / "params.yaml"
    data = yaml.safe_load(compose(params, [], root=PROJECT_ROOT).read_text())
    data["dreambooth"].update(
        {
            k: getattr(world.cfg.dreambooth, k)
            for k in (
                "learning_rate",
                "max_train_steps",
                "checkpointing_steps",
                "validation_steps",
                "num_validation_images",
                "validation_inference_steps",
                "optimizer",
                "train_text_encoder",
                "use_ema",
            )
        }
    )
    data["tracking"]["enabled"] = False
    params.write_text(yaml.safe_dump(data))
    paths = world.paths("db_killed")
    out = tmp_path / "db_killed"
    cmd = [
        sys.executable,
        "-m",
        "stages.dreambooth",
        "--params",
        str(params),
        "--base",
        str(world.base_dir),
        "--prepared",
        str(world.prepared),
        "--class-images",
        str(world.class_dir),
        "--out",
        str(out),
        "--checkpoints",
        str(paths.checkpoint_dir),
        "--reports",
        str(paths.reports_dir),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list(paths.checkpoint_dir.glob("checkpoint-*/complete.json")) and time.time() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists(), "killed before the end: no output expected"
    first = sorted(paths.checkpoint_dir.glob("checkpoint-*"))[0].name
    assert first != f"checkpoint-{world.cfg.dreambooth.max_train_steps:07d}"
    assert subprocess.run(cmd, capture_output=True).returncode == 0
    metrics = yaml.safe_load((paths.reports_dir / "metrics.json").read_text())
    assert metrics["steps"] == world.cfg.dreambooth.max_train_steps
    assert metrics["steps_run"] < world.cfg.dreambooth.max_train_steps, "rerun must resume, not start over"
    a, b = load_file(trained[0] / UNET_WEIGHTS), load_file(out / UNET_WEIGHTS)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    _pipe(out)  # a valid pipeline


def test_lora_param_count_loading_and_scale_zero(world, trained) -> None:
    db_dir, _ = trained
    rank = 4
    out = world.root / "models" / "lora" / f"r{rank}"
    metrics = lora.run(world.cfg, rank, db_dir, out, world.paths(f"lora_r{rank}"))
    pipe = _pipe(db_dir)
    targets = tuple(world.cfg.lora.target_modules)
    expected = sum(
        rank * (m.in_features + m.out_features)
        for name, m in pipe.unet.named_modules()
        if isinstance(m, torch.nn.Linear) and name.endswith(targets)
    )
    assert metrics["lora_params"] == expected
    saved = load_file(out / LORA_WEIGHT_NAME)
    assert sum(t.numel() for t in saved.values()) == expected

    def sample(**kwargs):
        return sample_latents_with(pipe, world.cfg.data.instance_prompt, **kwargs)

    before = sample()
    pipe.load_lora_weights(out)  # diffusers' public API, not the project's loader
    (adapter,) = pipe.unet.peft_config.values()
    assert (adapter.r, adapter.lora_alpha) == (rank, world.cfg.lora.alpha or rank)
    assert not torch.allclose(sample(), before, atol=1e-4)
    assert torch.allclose(sample(cross_attention_kwargs={"scale": 0.0}), before, atol=1e-5)


def test_lora_same_config_and_seed_give_bit_identical_weights(world, trained) -> None:
    """PEFT initialises lora_A from torch's global generator, which torch seeds differently in every process and
    which any earlier draw moves on: the stage seeds it, so two runs in one process (or two clones) agree."""
    db_dir, _ = trained
    runs = []
    for name in ("lora_same_a", "lora_same_b"):
        torch.rand(7)  # the global generator moves on between the runs, as it does between processes
        out = world.root / "models" / name
        lora.run(world.cfg, 4, db_dir, out, world.paths(name))
        runs.append(load_file(out / LORA_WEIGHT_NAME))
    a, b = runs
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def sample_latents_with(pipe: StableDiffusionPipeline, prompt: str, **kwargs) -> torch.Tensor:
    return pipe(
        prompt,
        num_inference_steps=3,
        height=RES,
        width=RES,
        output_type="latent",
        generator=torch.Generator().manual_seed(0),
        **kwargs,
    ).images


def test_untrained_featured_rank_error_says_how_to_add_it(world) -> None:
    cfg = copy.deepcopy(world.cfg)
    cfg.lora.rank = 16
    with pytest.raises(StageError, match=r"lora\.ranks=\[4,8,16,24\]"):
        featured_lora_dir(cfg.lora, Path("models/lora"))


def test_non_finite_loss_stops_with_clear_message_and_keeps_checkpoint(world, monkeypatch) -> None:
    real = losses.per_sample_mse
    calls = {"n": 0}

    def poisoned(pred, target, weights=None):
        calls["n"] += 1
        out = real(pred, target, weights)
        return out * float("nan") if calls["n"] > 15 else out

    monkeypatch.setattr("stages.lib.training.trainer.per_sample_mse", poisoned)
    cfg = copy.deepcopy(world.cfg)
    cfg.dreambooth.validation_steps = 1000  # keep probes from consuming calls
    paths = world.paths("db_nan")
    out = world.root / "models" / "db_nan"
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss .* step 1[0-9].*checkpoint-0000010"):
        dreambooth.run(cfg, world.base_dir, out, paths)
    assert (paths.checkpoint_dir / "checkpoint-0000010" / "complete.json").is_file()
    assert not out.exists()


def test_flat_params_are_logged_names() -> None:
    from stages.lib.config.schema import TrainConfig

    flat = to_flat_dict(TrainConfig(), "dreambooth.")
    assert flat["dreambooth.learning_rate"] == 2e-6 and "dreambooth.max_train_steps" in flat


def test_lora_alpha_other_than_rank_survives_reload(world, trained) -> None:
    cfg = copy.deepcopy(world.cfg)
    cfg.lora.alpha, cfg.lora.train.max_train_steps = 8.0, 2
    out = world.root / "models" / "lora_alpha"
    lora.run(cfg, 4, trained[0], out, world.paths("lora_alpha"))
    pipe = _pipe(trained[0])
    pipe.load_lora_weights(out)
    (adapter,) = pipe.unet.peft_config.values()
    assert (adapter.r, adapter.lora_alpha) == (4, 8)


def _captioned(world, tmp_path: Path, captions: dict[int, str]) -> tuple[FinetunePaths, int]:
    """The world's prepared photos copied with ``captions`` (photo index -> caption) in their manifest, and how
    many photos there are."""
    prepared = tmp_path / "prepared"
    shutil.copytree(world.prepared, prepared)
    manifest = Manifest.read(prepared / MANIFEST)
    for index, caption in captions.items():
        manifest.images[index].caption = caption
    manifest.write(prepared / MANIFEST)
    return replace(world.paths(tmp_path.name), prepared_dir=prepared), len(manifest.images)


def test_per_photo_captions_give_each_photo_its_own_prompt(world, tmp_path: Path) -> None:
    """A caption in prep's manifest replaces data.instance_prompt for its photo (one embedding per photo); the
    others keep the instance prompt."""
    paths, count = _captioned(world, tmp_path, {0: "a photo of sks man face in a forest"})
    pipe = _pipe(world.base_dir)
    data = build_training_data(pipe, world.cfg.dreambooth, world.cfg.data, paths)
    embeds = data.instance_embeds
    assert embeds.shape[0] == count > 2
    single = build_training_data(pipe, world.cfg.dreambooth, world.cfg.data, world.paths("one_prompt"))
    assert single.instance_embeds.shape[0] == 1
    assert torch.equal(embeds[1], single.instance_embeds[0]) and torch.equal(embeds[2], embeds[1])
    assert not torch.allclose(embeds[0], embeds[1])


def test_held_out_photos_keep_their_captions(world, tmp_path: Path) -> None:
    """With validation_holdout the held-out photos are probed with their own captions (the val_loss prompt), the
    training photos with theirs."""
    paths, count = _captioned(
        world,
        tmp_path,
        {0: "a photo of sks man face in a forest", -1: "a photo of sks man face in a kitchen"},
    )
    pipe = _pipe(world.base_dir)
    full = build_training_data(pipe, world.cfg.dreambooth, world.cfg.data, paths)
    held = build_training_data(
        pipe, replace(world.cfg.dreambooth, validation_holdout=1), world.cfg.data, paths
    )
    assert held.instance_embeds.shape[0] == count - 1 and len(held.holdout.mean) == 1
    assert torch.equal(held.instance_embeds, full.instance_embeds[:-1])
    # the held-out photo's kitchen caption, not the instance prompt
    assert torch.equal(held.holdout_embeds[0], full.instance_embeds[-1])
    assert not torch.allclose(held.holdout_embeds[0], full.instance_embeds[1])
    rows = held.rows("holdout", torch.zeros(3, dtype=torch.long))
    assert rows.shape[0] == 3 and torch.equal(rows[2], full.instance_embeds[-1])
