"""Pretraining the embedded default on the miniature world, through the same training loop as DreamBooth and LoRA.

The world's images are encoded once by the tiny VAE; every image keeps its own caption embedding (the loop picks
a batch's captions with its latents). The attribute reader is trained afterwards on VAE reconstructions with noisy
latents (what generated images look like) and saved beside the pipeline.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch
from diffusers import DDPMScheduler, StableDiffusionPipeline

from stages.lib.config.schema import TinyModelConfig
from stages.lib.imaging.images import to_pixels
from stages.lib.miniature.attribute_reader import (
    READER_DIR,
    ReaderTraining,
    label_tensors,
    save_reader,
    train_reader,
)
from stages.lib.miniature.world import SUBJECT_IDENTITY, WorldImage, render_world
from stages.lib.runtime.hashing import fingerprint, hash_files
from stages.lib.tracking.tracker import StageTracker
from stages.lib.training.checkpoints import CheckpointStore
from stages.lib.training.data import ImageSet, LatentCache, encode_latents
from stages.lib.training.finetune import encode_prompt, make_validation_hook, prompt_ids, write_loss_table
from stages.lib.training.trainer import DiffusionTrainer, TrainingData, accelerator_for

HERE = Path(__file__).parent
CODE_FILES = [
    HERE / "pretrain.py",
    HERE.parent / "training" / "trainer.py",
    HERE / "world.py",
    HERE / "tiny_vae.py",
]
VALIDATION_PROMPT = "a photo of man face"


def world_pixels(cfg: TinyModelConfig) -> tuple[torch.Tensor, list[WorldImage]]:
    """The world's images as a (N, 3, H, W) tensor in [-1, 1], and what each shows."""
    rendered = render_world(
        cfg.world.seed, range(cfg.world.num_images), cfg.sample_size, cfg.world.caption_dropout
    )
    return to_pixels([image for image, _ in rendered], cfg.sample_size), [item for _, item in rendered]


def caption_embeddings(
    pipe: StableDiffusionPipeline, captions: list[str], batch_size: int = 256
) -> torch.Tensor:
    """(N, 77, D) text embeddings of ``captions`` with the pipeline's frozen text encoder, in batches."""
    chunks = [captions[i : i + batch_size] for i in range(0, len(captions), batch_size)]
    return torch.cat([encode_prompt(pipe, chunk) for chunk in chunks])


def pretrain_unet(
    pipe: StableDiffusionPipeline,
    cfg: TinyModelConfig,
    latents: LatentCache,
    captions: list[str],
    checkpoint_dir: Path,
    reports_dir: Path,
    tracker: StageTracker,
) -> dict[str, float]:
    """Train every UNet parameter on the world (resumable from ``checkpoint_dir``); returns the loop's metrics."""
    train = cfg.pretrain
    device = pipe.unet.device
    accelerator = accelerator_for(train, device)
    data = TrainingData(
        instance=latents.to(device), instance_embeds=caption_embeddings(pipe, captions).to(device)
    )
    params = dict(pipe.unet.named_parameters())
    if train.train_text_encoder:  # the words of the world's captions learn what they show
        pipe.text_encoder.to(device).requires_grad_(True).train()
        params |= {f"text_encoder.{n}": p for n, p in pipe.text_encoder.named_parameters()}
        data.text_encoder, data.instance_ids = pipe.text_encoder, prompt_ids(pipe, captions)
    else:
        pipe.text_encoder.requires_grad_(False)
    store = CheckpointStore(
        checkpoint_dir,
        fingerprint("pretrain", asdict(cfg), hash_files(CODE_FILES)),
        train.checkpoints_total_limit,
    )
    pipe.vae.requires_grad_(False)
    pipe.unet.requires_grad_(True)
    trainer = DiffusionTrainer(
        train,
        pipe.unet,
        DDPMScheduler.from_config(pipe.scheduler.config),
        data,
        params,
        store,
        tracker,
        accelerator,
        validate_images=make_validation_hook(pipe, train, VALIDATION_PROMPT, tracker, reports_dir),
    )
    result = trainer.run()
    pipe.unet.requires_grad_(False).eval()
    pipe.text_encoder.requires_grad_(False).eval()
    tracker.log_artifact(write_loss_table(result.history, reports_dir / "loss.csv"))
    kept = {k: v for k, v in result.metrics.items() if "class_probe" not in k and k != "final_instance_loss"}
    return {f"pretrain_{k}": v for k, v in kept.items()}  # no class images here: their probes are NaN


@torch.no_grad()
def generation_like(
    pipe: StableDiffusionPipeline, latents: LatentCache, noise_scale: float, seed: int
) -> torch.Tensor:
    """Decode the world's latents with noise added: inputs that look like the pipeline's generations."""
    g = torch.Generator().manual_seed(seed)
    vae = pipe.vae
    out = []
    for mean in latents.mean.split(256):
        scale = noise_scale * torch.rand((mean.shape[0], 1, 1, 1), generator=g)
        noisy = mean + scale * mean.std() * torch.randn(mean.shape, generator=g)
        out.append(vae.decode(noisy.to(vae.device, vae.dtype)).sample.float().clamp(-1, 1).cpu())
    return torch.cat(out)


def fit_reader(
    pipe: StableDiffusionPipeline,
    cfg: TinyModelConfig,
    latents: LatentCache,
    items: list[WorldImage],
    out_dir: Path,
) -> dict[str, float]:
    """Train and save the attribute reader; returns its held-out accuracy per attribute."""
    pixels = generation_like(pipe, latents, cfg.world.reader_noise, cfg.world.seed)
    labels = label_tensors(items)
    training = ReaderTraining(steps=cfg.world.reader_steps, seed=cfg.world.seed)
    holdout = max(1, len(items) // 10)
    reader, acc = train_reader(pixels, labels, training, holdout)
    subject = {**SUBJECT_IDENTITY.__dict__}
    save_reader(
        reader,
        out_dir / READER_DIR,
        {"subject": subject, "heldout_accuracy": acc, "training": asdict(training)},
    )
    return {f"reader_accuracy_{name}": value for name, value in acc.items()}


def pretrain_tiny(
    pipe: StableDiffusionPipeline,
    cfg: TinyModelConfig,
    out_dir: Path,
    checkpoint_dir: Path,
    reports_dir: Path,
    tracker: StageTracker,
) -> dict[str, float]:
    """Render the world, pretrain the UNet on it and fit the attribute reader into ``out_dir``.

    With ``pretrain.max_train_steps=0`` and ``world.reader_steps=0`` the random initialisation is kept (tests).
    """
    if cfg.pretrain.max_train_steps <= 0 and cfg.world.reader_steps <= 0:
        return {}
    pixels, items = world_pixels(cfg)
    latents = encode_latents(pipe.vae, ImageSet(pixels, [], []), batch_size=256)
    metrics: dict[str, float] = {"world_images": float(len(items))}
    if cfg.pretrain.max_train_steps > 0:
        metrics |= pretrain_unet(
            pipe, cfg, latents, [i.caption for i in items], checkpoint_dir, reports_dir, tracker
        )
    if cfg.world.reader_steps > 0:
        metrics |= fit_reader(pipe, cfg, latents.to(torch.device("cpu")), items, out_dir)
    return metrics
