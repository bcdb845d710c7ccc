"""The tiny default's pretraining on the miniature world (base stage) through the shared training loop."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import CLIPTokenizer

from stages import base
from stages.lib.config.schema import PipelineConfig
from stages.lib.miniature.attribute_reader import READER_DIR, load_reader
from stages.lib.training.data import LatentCache
from stages.lib.training.trainer import TrainingData

UNET = "unet/diffusion_pytorch_model.safetensors"
TEXT_ENCODER = "text_encoder/model.safetensors"


def small_pretraining(cfg: PipelineConfig, steps: int = 30) -> PipelineConfig:
    tiny = cfg.model.tiny
    tiny.world.num_images = 240
    tiny.world.reader_steps = 40
    tiny.pretrain.max_train_steps = steps
    tiny.pretrain.train_batch_size = 8
    tiny.pretrain.lr_warmup_steps = 5
    tiny.pretrain.checkpointing_steps = 10
    tiny.pretrain.validation_steps = steps
    tiny.pretrain.num_validation_images = 2
    tiny.pretrain.validation_inference_steps = 2
    return cfg


def test_rows_pick_each_images_caption() -> None:
    cache = LatentCache(torch.zeros(3, 4, 2, 2), torch.zeros(3, 4, 2, 2), 1.0)
    per_image = torch.arange(3.0).view(3, 1, 1).expand(3, 77, 8)
    data = TrainingData(instance=cache, instance_embeds=per_image)
    picked = data.rows("instance", torch.tensor([2, 0, 2]))
    assert picked[:, 0, 0].tolist() == [2.0, 0.0, 2.0]
    shared = TrainingData(instance=cache, instance_embeds=torch.ones(1, 77, 8))
    assert shared.rows("instance", torch.tensor([1, 2])).shape == (2, 77, 8)


def test_rows_encode_each_images_caption_when_the_text_encoder_trains() -> None:
    cache = LatentCache(torch.zeros(3, 4, 2, 2), torch.zeros(3, 4, 2, 2), 1.0)
    ids = torch.arange(3).view(3, 1).expand(3, 77)
    encoder = torch.nn.Embedding(3, 8)
    data = TrainingData(cache, torch.zeros(3, 77, 8), text_encoder=lambda x: (encoder(x),), instance_ids=ids)
    picked = data.rows("instance", torch.tensor([2, 0]))
    assert torch.equal(picked, encoder(ids[[2, 0]])) and picked.requires_grad


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, float], PipelineConfig]:
    from stages.compose import compose
    from stages.lib.config.loader import load_config

    from .conftest import PROJECT_ROOT

    root = tmp_path_factory.mktemp("pretrain")
    cfg = small_pretraining(load_config(compose(root / "params.yaml", [], root=PROJECT_ROOT)))
    cfg.tracking.enabled = False
    metrics = base.run(cfg, root / "base", root / "reports", root / "ckpt")
    return root, metrics, cfg


def test_pretraining_lowers_the_loss_and_saves_the_reader(pretrained) -> None:
    root, metrics, _ = pretrained
    assert metrics["pretrain_steps"] == 30 and metrics["world_images"] == 240
    assert metrics["pretrain_val_loss"] < 0.5 * metrics["pretrain_val_loss_start"], metrics
    assert metrics["reader_accuracy_scene"] > 0.5, metrics
    reader, info = load_reader(root / "base" / READER_DIR)
    assert info["subject"]["hair_colour"] == "ginger" and set(info["heldout_accuracy"]) == set(
        reader.attributes
    )
    table = (root / "reports" / "loss.csv").read_text().splitlines()
    assert table[0].startswith("step,loss") and len(table) == 31
    saved = json.loads((root / "reports" / "metrics.json").read_text())
    assert saved["pretrain_val_loss"] == pytest.approx(metrics["pretrain_val_loss"])
    assert (root / "reports" / "validation" / "step-000030.png").is_file()


def test_pretraining_resumes_from_its_checkpoint_and_is_deterministic(pretrained, tmp_path: Path) -> None:
    root, _, cfg = pretrained
    again = base.run(cfg, tmp_path / "again", tmp_path / "reports", root / "ckpt")
    assert again["pretrain_steps_run"] == 0  # the final checkpoint of this exact config is reused
    fresh = base.run(cfg, tmp_path / "fresh", tmp_path / "reports2", tmp_path / "ckpt")
    assert fresh["pretrain_steps_run"] == 30
    a, b = load_file(root / "base" / UNET), load_file(tmp_path / "fresh" / UNET)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    c = load_file(tmp_path / "again" / UNET)
    assert all(torch.equal(a[k], c[k]) for k in a)
    trained, resumed = load_file(root / "base" / TEXT_ENCODER), load_file(tmp_path / "again" / TEXT_ENCODER)
    assert all(torch.equal(trained[k], resumed[k]) for k in trained)  # the text encoder is checkpointed too


def test_pretraining_trains_the_text_encoder_on_the_captions(pretrained, tmp_path: Path) -> None:
    root, _, cfg = pretrained
    assert cfg.model.tiny.pretrain.train_text_encoder
    trained = load_file(root / "base" / TEXT_ENCODER)
    cfg.model.tiny.pretrain.max_train_steps = 0
    cfg.model.tiny.world.reader_steps = 0
    try:
        base.run(cfg, tmp_path / "random", tmp_path / "reports", tmp_path / "ckpt")
    finally:
        cfg.model.tiny.pretrain.max_train_steps, cfg.model.tiny.world.reader_steps = 30, 40
    random_init = load_file(tmp_path / "random" / TEXT_ENCODER)
    name = "embeddings.token_embedding.weight"
    moved = (trained[name] - random_init[name]).norm(dim=1)
    tokenizer = CLIPTokenizer.from_pretrained(root / "base" / "tokenizer")
    forest, sks = (tokenizer.convert_tokens_to_ids(f"{word}</w>") for word in ("forest", "sks"))
    assert moved[forest] > 10 * moved[sks], "caption words train; the never-seen 'sks' only decays"
