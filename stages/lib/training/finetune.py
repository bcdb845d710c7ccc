"""What DreamBooth and LoRA stages share around the training loop: data, device placement, validation images,
checkpoint fingerprints and the loss table for ``dvc plots``."""

from __future__ import annotations

import argparse
import csv
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.utils.checkpoint
from diffusers import DDPMScheduler, StableDiffusionPipeline

from stages.lib.config.schema import ComputeConfig, DataConfig, TrainConfig
from stages.lib.imaging.images import make_grid, save_image, view_cell
from stages.lib.models.loading import allows_half_precision
from stages.lib.runtime.hashing import fingerprint, hash_files
from stages.lib.runtime.timings import phase
from stages.lib.tracking.tracker import StageTracker
from stages.lib.training.checkpoints import CheckpointStore
from stages.lib.training.data import (
    ImageSet,
    encode_latents,
    face_weight_maps,
    load_image_folder,
    load_instance_set,
)
from stages.lib.training.graphed_denoiser import GraphedDenoiser, graphed_sampling
from stages.lib.training.trainer import DiffusionTrainer, TrainingData, TrainResult, accelerator_for

CODE_FILES = [Path(__file__), Path(__file__).with_name("trainer.py"), Path(__file__).with_name("losses.py")]


@dataclass
class FinetunePaths:
    """Inputs and scratch space of a fine-tuning stage (all given by dvc.yaml)."""

    prepared_dir: Path
    class_dir: Path | None
    checkpoint_dir: Path
    reports_dir: Path

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser, checkpoints: str | None, reports: str | None) -> None:
        """``--prepared``, ``--class-images``, ``--checkpoints`` and ``--reports``; the last two default to the
        given folders, or are required where None."""
        parser.add_argument("--prepared", type=Path, default=Path("data/prepared"))
        parser.add_argument("--class-images", type=Path, default=Path("data/class_images"))
        for flag, default in (("--checkpoints", checkpoints), ("--reports", reports)):
            if default is None:
                parser.add_argument(flag, type=Path, required=True)
            else:
                parser.add_argument(flag, type=Path, default=Path(default))

    @classmethod
    def from_arguments(cls, args: argparse.Namespace) -> FinetunePaths:
        """The paths parsed by :meth:`add_arguments`."""
        return cls(args.prepared, args.class_images, args.checkpoints, args.reports)


def prompt_ids(pipe: StableDiffusionPipeline, prompt: str | list[str]) -> torch.Tensor:
    """(N, 77) token ids of one prompt (N = 1) or a list, padded like SD."""
    tok = pipe.tokenizer
    ids = tok(
        prompt, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt"
    )
    return ids.input_ids.to(pipe.text_encoder.device)


@torch.no_grad()
def encode_prompt(pipe: StableDiffusionPipeline, prompt: str | list[str]) -> torch.Tensor:
    """(N, 77, D) text embeddings of one prompt (N = 1) or a list, computed once."""
    return pipe.text_encoder(prompt_ids(pipe, prompt))[0].float()


def place_frozen_modules(pipe: StableDiffusionPipeline, cfg: TrainConfig, device: torch.device) -> None:
    """VAE and text encoder frozen on the device (half precision under CUDA mixed precision); UNet in fp32."""
    with phase("load"):
        half = (
            {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.mixed_precision)
            if device.type == "cuda" and allows_half_precision(pipe)
            else None
        )
        pipe.text_encoder.to(device)  # trained in fp32 when train_text_encoder, else frozen below
        for module in [pipe.vae] if cfg.train_text_encoder else [pipe.vae, pipe.text_encoder]:
            module.requires_grad_(False).eval().to(device)
            if half is not None:
                module.to(dtype=half)
        pipe.unet.to(device)
        if cfg.gradient_checkpointing:
            enable_gradient_checkpointing(pipe.unet)


def draws_random_numbers(model: torch.nn.Module) -> bool:
    """Whether ``model``'s forward draws random numbers in training mode (a dropout with p > 0)."""
    return any(isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.p > 0 for m in model.modules())


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """diffusers' gradient checkpointing (non-reentrant), stashing the RNG state only where ``model`` has an
    active dropout. SD's UNet and ControlNet have none (dropout 0), so the recomputation needs no RNG state, which
    keeps RNG state calls out of the captured CUDA-graph step; the gradients are those without checkpointing."""
    preserve_rng_state = draws_random_numbers(model)

    def checkpointed(module: torch.nn.Module, *args: object) -> object:
        return torch.utils.checkpoint.checkpoint(
            module.__call__, *args, use_reentrant=False, preserve_rng_state=preserve_rng_state
        )

    model.enable_gradient_checkpointing(checkpointed)


def half_frozen_layers(module: torch.nn.Module, dtype: torch.dtype) -> int:
    """Store the frozen Linear and Conv2d weights of ``module`` in ``dtype`` (the autocast dtype); returns how many.

    Under autocast these layers compute in ``dtype`` anyway, so the result is unchanged and the per-step casts of
    the frozen weights disappear. Norm layers (autocast runs them in float32) and trained parameters keep float32.
    """
    count = 0
    for layer in module.modules():
        if isinstance(layer, torch.nn.Linear | torch.nn.Conv2d):
            for p in layer.parameters(recurse=False):
                if not p.requires_grad and p.dtype == torch.float32:
                    p.data = p.data.to(dtype)
                    count += 1
    return count


def apply_training_levers(
    denoiser: torch.nn.Module, cfg: TrainConfig, compute: ComputeConfig, device: torch.device
) -> None:
    """The layout levers of ``compute`` on CUDA (before the optimizer packs the trained weights): frozen layers
    in bf16 under bf16 autocast, convolutions channels-last. Neither changes what is computed beyond rounding."""
    if device.type != "cuda":
        return
    if cfg.mixed_precision == "bf16" and compute.half_frozen_weights:
        half_frozen_layers(denoiser, torch.bfloat16)
    if compute.channels_last:
        denoiser.to(memory_format=torch.channels_last)


@contextmanager
def training_attention(compute: ComputeConfig, device: torch.device) -> Iterator[None]:
    """Within the block, on CUDA, attention without cuDNN's fused kernels unless
    ``compute.cudnn_attention_in_training``: cuDNN compiles one per input shape on first use, and a training stage
    meets many (training, probe, validation and latent-encoding batches; forward and backward): ~10 s of an SD1.5
    stage, where PyTorch's flash attention runs as fast (``benchmarks/attention_first_use.py``)."""
    if device.type != "cuda" or compute.cudnn_attention_in_training:
        yield
        return
    previous = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(False)
    try:
        yield
    finally:
        torch.backends.cuda.enable_cudnn_sdp(previous)


Conditioning = Callable[[torch.Tensor], torch.Tensor]  # images in [-1, 1] (N, 3, H, W) -> maps (N, C, H, W)
# (instance images, their maps) -> the (image, map) pairs to train on (ControlNet training: added moved copies)
PairAugment = Callable[[ImageSet, torch.Tensor], tuple[ImageSet, torch.Tensor]]


def build_training_data(
    pipe: StableDiffusionPipeline,
    cfg: TrainConfig,
    data_cfg: DataConfig,
    paths: FinetunePaths,
    conditioning: Conditioning | None = None,
    augment: PairAugment | None = None,
) -> TrainingData:
    """Encode instance (+ held-out) and class images once; prompts once; face maps from prep's manifest.

    ``conditioning`` (ControlNet training) also turns every image into its conditioning map, row for row, and
    ``augment`` then turns the training photos and their maps into the pairs to train on (held-out photos and
    class images are left as they are).
    """
    device = pipe.unet.device
    instances, holdout = load_instance_set(paths.prepared_dir, cfg.resolution).split(cfg.validation_holdout)
    instance_cond = None
    if conditioning is not None:
        instance_cond = conditioning(instances.pixels)
        if augment is not None:
            instances, instance_cond = augment(instances, instance_cond)
    instance_cache = encode_latents(pipe.vae, instances)
    latent_size = instance_cache.mean.shape[-1]
    weights = None
    if cfg.face_loss_weight != 1.0:
        weights = face_weight_maps(
            instances.face_boxes, cfg.resolution, latent_size, cfg.face_loss_weight
        ).to(device)
    # one prompt per photo where prep's manifest has captions, else data.instance_prompt for all
    prompts = instances.prompts(data_cfg.instance_prompt)
    data = TrainingData(
        instance=instance_cache.to(device),
        instance_embeds=encode_prompt(pipe, prompts).to(device),
        instance_weights=weights,
    )
    if holdout is not None:  # held-out photos probe with their own captions, like the training photos
        data.holdout = encode_latents(pipe.vae, holdout).to(device)
        holdout_prompts = holdout.prompts(data_cfg.instance_prompt)
        data.holdout_embeds = encode_prompt(pipe, holdout_prompts).to(device)
        if cfg.train_text_encoder:
            data.holdout_ids = prompt_ids(pipe, holdout_prompts)
    if instance_cond is not None:
        data.cond["instance"] = instance_cond.to(device)
    if conditioning is not None:
        if holdout is not None:
            data.cond["holdout"] = conditioning(holdout.pixels).to(device)
    if paths.class_dir is not None:  # probed always, trained on only with prior preservation
        classes = load_image_folder(paths.class_dir, cfg.resolution, "class")
        data.class_probe = encode_latents(pipe.vae, classes).to(device)
        data.class_embeds = encode_prompt(pipe, data_cfg.class_prompt).to(device)
        data.with_prior = cfg.with_prior_preservation
        data.class_ids = prompt_ids(pipe, data_cfg.class_prompt)
        if conditioning is not None:
            data.cond["class"] = conditioning(classes.pixels).to(device)
    if cfg.train_text_encoder:
        data.text_encoder = pipe.text_encoder
        data.instance_ids = prompt_ids(pipe, prompts)
    return data


def sample_validation(pipe: StableDiffusionPipeline, cfg: TrainConfig, prompt: str, **extra: object) -> list:
    """Seeded validation images with the training settings, under bf16 autocast on CUDA (where the frozen modules
    may be half precision); ``extra`` goes to the pipeline (e.g. a ControlNet's ``image``)."""
    device = pipe.unet.device
    with torch.autocast(device.type, enabled=device.type == "cuda", dtype=torch.bfloat16):
        return pipe(
            prompt,
            num_images_per_prompt=cfg.num_validation_images,
            num_inference_steps=cfg.validation_inference_steps,
            guidance_scale=cfg.validation_guidance_scale,
            height=cfg.resolution,
            width=cfg.resolution,
            generator=torch.Generator().manual_seed(cfg.seed),
            **extra,
        ).images


def save_validation_grid(grid, step: int, reports_dir: Path, tracker: StageTracker) -> None:
    """``reports_dir/validation/step-NNNNNN.png`` and the same image in MLflow."""
    save_image(grid, reports_dir / "validation" / f"step-{step:06d}.png")
    tracker.log_image(grid, f"validation/step-{step:06d}.png")


def make_validation_hook(
    pipe: StableDiffusionPipeline,
    cfg: TrainConfig,
    prompt: str,
    tracker: StageTracker,
    reports_dir: Path,
    denoiser: GraphedDenoiser | None = None,
):
    """A callback that samples seeded validation images with the UNet being trained and logs a grid;
    ``denoiser``: the UNet's forward as CUDA graph replays (None: eager)."""

    def validate(step: int) -> None:
        if cfg.num_validation_images <= 0:
            return
        pipe.set_progress_bar_config(disable=True)
        was_training = pipe.unet.training
        pipe.unet.eval()
        with graphed_sampling(pipe.unet, denoiser):
            images = sample_validation(pipe, cfg, prompt)
        pipe.unet.train(was_training)
        grid = make_grid(images, columns=len(images), cell=view_cell(images))
        save_validation_grid(grid, step, reports_dir, tracker)

    return validate


def write_loss_table(history: list[dict[str, float]], path: Path) -> Path:
    """Per-step losses as CSV for ``dvc plots`` (x: step)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    keys = ["step", "loss", "instance_loss", "prior_loss", "lr"]
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=[k for k in keys if not history or k in history[0]])
        writer.writeheader()
        for row in history:
            writer.writerow({k: row[k] for k in writer.fieldnames})
    return path


def finetune(
    stage: str,
    cfg: TrainConfig,
    data_cfg: DataConfig,
    pipe: StableDiffusionPipeline,
    params: dict[str, torch.nn.Parameter],
    paths: FinetunePaths,
    tracker: StageTracker,
    identity: dict[str, object],
    *,
    denoiser: torch.nn.Module | None = None,
    conditioning: Conditioning | None = None,
    augment: PairAugment | None = None,
    validate_images: Callable[[int], None] | None = None,
    compute: ComputeConfig | None = None,
) -> TrainResult:
    """Run the shared loop over ``params`` of ``pipe.unet``; ``identity`` adds stage-specific fingerprint parts.

    ``compute`` carries the speed levers (CUDA graphs, the flat 8-bit optimizer, the attention kernels).
    ControlNet training passes ``denoiser`` (a ControlNet steering ``pipe.unet``), ``conditioning`` (image ->
    conditioning map), optionally ``augment`` (the training pairs from the photos and their maps) and its own
    ``validate_images`` hook (default: samples of ``pipe``).
    """
    device = pipe.unet.device
    accelerator = accelerator_for(cfg, device)
    compute = compute or ComputeConfig()
    with training_attention(compute, device):
        apply_training_levers(denoiser if denoiser is not None else pipe.unet, cfg, compute, device)
        with phase("encode"):
            data = build_training_data(pipe, cfg, data_cfg, paths, conditioning, augment)
        inputs = [paths.prepared_dir] + ([paths.class_dir] if paths.class_dir else [])
        store = CheckpointStore(
            paths.checkpoint_dir,
            fingerprint(stage, asdict(cfg), asdict(data_cfg), identity, hash_files(inputs + CODE_FILES)),
            cfg.checkpoints_total_limit,
        )
        # validation's two images are too few to keep the GPU busy eagerly: replay the UNet as CUDA graphs
        graphed = GraphedDenoiser(pipe.unet) if compute.cuda_graphs and device.type == "cuda" else None
        hook = validate_images or make_validation_hook(
            pipe, cfg, data_cfg.instance_prompt, tracker, paths.reports_dir, graphed
        )
        trainer = DiffusionTrainer(
            cfg,
            denoiser if denoiser is not None else pipe.unet,
            DDPMScheduler.from_config(pipe.scheduler.config),
            data,
            params,
            store,
            tracker,
            accelerator,
            validate_images=hook if accelerator.is_main_process else None,
            compute=compute,
        )
        result = trainer.run()
        if graphed is not None:
            graphed.release()
        if accelerator.is_main_process:
            tracker.log_artifact(write_loss_table(result.history, paths.reports_dir / "loss.csv"))
        return result
