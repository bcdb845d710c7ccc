"""Batched, seeded text-to-image sampling shared by the class-image, inference and ControlNet stages.

A flat queue of :class:`Job` (prompt, seed, result key, optional PNG path) is cut into batches regardless of how
the prompts split, so one pipeline call mixes prompts. Every image has its own ``torch.Generator`` seeded with its
job's seed, so an image depends on nothing but its seed and prompt: the batch size (``auto`` or an int) changes the
speed, not the images (batched matmuls round the last float bits differently: within one grey level).

Per batch: one pipeline call to latents, the VAE decode in chunks (its activations, not the UNet's, set the peak
memory of a large batch), and the PNGs handed to background threads so that encoding overlaps the next batch.
On ``torch.cuda.OutOfMemoryError`` the batch is split in halves and retried, and the rest of the queue goes on at
that size; nothing is lost or changed.

Speed levers (``compute.channels_last``, ``fuse_qkv``, ``compile_unet``) are applied once per pipeline by
:func:`prepare_for_sampling`, on CUDA only: on the 2-core CPU none speeds up the tiny default (64 px, 20 steps,
batch 32: plain 15.4-15.5 img/s, channels-last 15.3-16.0, fused q/k/v 15.4; compiling costs more than a stage
samples).
"""

from __future__ import annotations

import gc
import logging
import os
from collections import deque
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image
from tqdm.auto import tqdm

from stages.lib.config.batch_size import AUTO, parse_batch_size
from stages.lib.errors import StageError
from stages.lib.runtime.quiet import progress_interval
from stages.lib.runtime.threads import BackgroundJobs
from stages.lib.runtime.timings import phase

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

    from stages.lib.config.schema import ComputeConfig

__all__ = [
    "AUTO",
    "Job",
    "Sample",
    "ImageWriter",
    "auto_batch_size",
    "apply_levers",
    "parse_batch_size",
    "prepare_for_sampling",
    "resolve_batch_size",
    "sample",
    "write_png",
]

log = logging.getLogger(__name__)

MAX_AUTO_BATCH = 32  # SD1.5 on an H200: 4.54 / 4.96 img/s at batch 8 / 32; no gain beyond
# CUDA memory of one 512x512 image with classifier-free guidance in fp16, whole-batch VAE decode included
# (plain diffusers on an H200: 6.8 GiB at batch 8, 21.1 GiB at batch 32); the chunked decode here needs less
CUDA_BYTES_PER_IMAGE = 0.6 * 2**30
CUDA_HEADROOM_BYTES = 2**30  # left free for the allocator's fragmentation and cuDNN workspaces
# CPU: pixels per call. The tiny default (64 px, 20 steps, 2 threads on the idle 2-core CPU) samples 12.3-12.9 /
# 13.2-14.8 / 13.8-15.8 / 12.4-13.6 img/s at batch 8 / 16 / 32 / 64: 32 images of 64 px. Larger images get
# proportionally fewer, down to one (SD1.5 at 512 px on a CPU is compute bound at batch 1).
CPU_AUTO_PIXELS = 32 * 64 * 64
DECODE_PIXELS = 8 * 512 * 512  # pixels per VAE decode call: 8 SD1.5 images
PNG_WORKERS = 2
COMPILE_CACHE = Path(__file__).resolve().parents[2] / "checkpoints" / "torch_compile"  # git-ignored


@dataclass(frozen=True)
class Job:
    """One image: ``prompt`` drawn from ``torch.Generator().manual_seed(seed)``; its result is ``key``'s.

    ``path``: where its PNG goes (written atomically in the background); ``inputs``: per-image pipeline
    arguments collected into one list per batch (a ControlNet pipeline's ``image``).
    """

    prompt: str
    seed: int
    key: Hashable
    path: Path | None = None
    inputs: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class Sample:
    """One job's result: the image and its unscaled final latents (C x h x w, float32, CPU) when kept."""

    image: Image.Image | None = None
    latent: torch.Tensor | None = None


# -- batch size ------------------------------------------------------------------------------------------------


def _device(pipe: DiffusionPipeline) -> torch.device:
    return pipe._execution_device


def auto_batch_size(pipe: DiffusionPipeline, height: int, width: int, guidance_scale: float) -> int:
    """The batch size ``auto`` stands for on the pipeline's device at this image size.

    CUDA: what fits in the free memory (the driver's free memory plus what PyTorch's allocator holds unused, less
    a headroom) at ``CUDA_BYTES_PER_IMAGE`` per 512x512 image, scaled by pixels, dtype size, guidance (the UNet
    runs twice as many latents) and a ControlNet, capped at ``MAX_AUTO_BATCH``. CPU: ``CPU_AUTO_PIXELS`` pixels.
    """
    pixels = height * width
    device = _device(pipe)
    if device.type != "cuda":
        return max(1, min(MAX_AUTO_BATCH, CPU_AUTO_PIXELS // pixels))
    free, _ = torch.cuda.mem_get_info(device)
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    per_image = CUDA_BYTES_PER_IMAGE * pixels / (512 * 512) * pipe.unet.dtype.itemsize / 2
    per_image *= 1.0 if guidance_scale > 1 else 0.6
    per_image *= 1.5 if getattr(pipe, "controlnet", None) is not None else 1.0
    return max(1, min(MAX_AUTO_BATCH, int((free - CUDA_HEADROOM_BYTES) // per_image)))


def resolve_batch_size(
    value: int | str, pipe: DiffusionPipeline, height: int, width: int, guidance_scale: float, key: str
) -> int:
    """``value`` (``auto`` or a positive integer, as config gives it) as a number of images per call."""
    parsed = parse_batch_size(value, key)
    return auto_batch_size(pipe, height, width, guidance_scale) if parsed == AUTO else int(parsed)


def _batches(jobs: Sequence[Job], size: int) -> list[list[Job]]:
    """``jobs`` in order, in as few batches of at most ``size`` as possible, of sizes differing by at most one
    (40 jobs at 32: 20 + 20, not 32 + 8: no tail call that leaves the GPU idle, fewer shapes to compile)."""
    if not jobs:
        return []
    count = -(-len(jobs) // size)
    base, extra = divmod(len(jobs), count)
    bounds = [0]
    for b in range(count):
        bounds.append(bounds[-1] + base + (b < extra))
    return [list(jobs[bounds[b] : bounds[b + 1]]) for b in range(count)]


# -- speed levers ----------------------------------------------------------------------------------------------


def _fusion_wanted(model: torch.nn.Module) -> bool:
    """Fused attention reads ``to_qkv`` / ``to_kv`` and so bypasses LoRA layers on ``to_q``/``to_k``/``to_v``:
    fuse only a model without adapters."""
    return getattr(model, "_sampling_fuse_qkv", False) and not getattr(model, "peft_config", None)


def _is_fused(model: torch.nn.Module) -> bool:
    from diffusers.models.attention_processor import FusedAttnProcessor2_0

    return any(isinstance(p, FusedAttnProcessor2_0) for p in model.attn_processors.values())


def sync_qkv_fusion(pipe: DiffusionPipeline) -> None:
    """Fuse the q/k/v projections of the UNet and VAE that :func:`apply_levers` marked, or unfuse them while
    LoRA adapters are loaded (infer and controlnet load and unload adapters between calls). Re-fusing copies the
    current weights; a no-op for unmarked models."""
    for model in (pipe.unet, pipe.vae):
        if not getattr(model, "_sampling_fuse_qkv", False):
            continue
        wanted, fused = _fusion_wanted(model), _is_fused(model)
        if wanted and not fused:
            model.fuse_qkv_projections()
        elif fused and not wanted:
            model.unfuse_qkv_projections()


def apply_levers(
    pipe: DiffusionPipeline,
    *,
    channels_last: bool = False,
    fuse_qkv: bool = False,
    compile_unet: bool = False,
) -> DiffusionPipeline:
    """Apply the sampling speed levers to ``pipe`` (any device; :func:`prepare_for_sampling` decides which).

    - ``channels_last``: UNet, VAE (and ControlNet) weights in NHWC, so cuDNN's convolutions skip layout transposes.
    - ``fuse_qkv``: diffusers' ``fuse_qkv_projections`` on the UNet and VAE: one matmul for q, k and v of each
      self-attention (k and v of each cross-attention) instead of three; kept off while LoRA adapters are loaded.
    - ``compile_unet``: ``torch.compile`` of the UNet in place (``unet.compile()``: the module stays a
      ``UNet2DConditionModel``, so LoRA loading keeps working), with Inductor's cache under ``checkpoints/``
      unless ``TORCHINDUCTOR_CACHE_DIR`` is set, so later runs skip most of the minutes of the first compile.

    Idempotent: a second call changes nothing.
    """
    models = [pipe.unet, pipe.vae, getattr(pipe, "controlnet", None)]
    if channels_last:
        for model in models:
            if isinstance(model, torch.nn.Module):
                model.to(memory_format=torch.channels_last)
    if fuse_qkv:
        for model in (pipe.unet, pipe.vae):
            if hasattr(model, "fuse_qkv_projections"):
                model._sampling_fuse_qkv = True
        try:
            sync_qkv_fusion(pipe)
        except ValueError as err:  # models with added KV projections refuse
            log.warning("fuse_qkv: left off (%s)", err)
            for model in (pipe.unet, pipe.vae):
                model._sampling_fuse_qkv = False
    if compile_unet and getattr(pipe.unet, "_compiled_call_impl", None) is None:
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(COMPILE_CACHE))
        log.info("compiling the UNet (Inductor cache: %s)", os.environ["TORCHINDUCTOR_CACHE_DIR"])
        pipe.unet.compile()
    return pipe


def prepare_for_sampling(pipe: DiffusionPipeline, compute: ComputeConfig | None) -> DiffusionPipeline:
    """Apply ``compute``'s sampling levers to a pipeline already on its device: on CUDA only (on the CPU none
    speeds up the tiny default; ``apply_levers`` documents each). Returns ``pipe``; call it once per pipeline."""
    if compute is None or _device(pipe).type != "cuda":
        return pipe
    return apply_levers(
        pipe,
        # NHWC made fp16 sampling slower in eager mode (SD1.5, 512 px, H100: 0.75x -> 0.88x of the plain
        # pipeline without it); the compiled UNet can use it.
        channels_last=compute.channels_last and compute.compile_unet,
        fuse_qkv=compute.fuse_qkv,
        compile_unet=compute.compile_unet,
    )


# -- writing ---------------------------------------------------------------------------------------------------


def write_png(image: Image.Image, path: Path) -> Path:
    """Write ``path`` atomically (a hidden ``.<name>.tmp.png`` beside it, then a rename), creating its folder;
    a failure is a ``StageError`` naming the file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(tmp, format="PNG")
        tmp.replace(path)
    except OSError as err:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        raise StageError(f"{path}: cannot write the image ({err})") from err
    return path


class ImageWriter(BackgroundJobs):
    """PNGs written by a few background threads (Pillow's encoder releases the GIL); a failed write is
    re-raised by the next :meth:`submit` or by :meth:`close`, which waits for every write."""

    def __init__(self, workers: int = PNG_WORKERS, max_pending: int = 64) -> None:
        super().__init__(workers, max_pending, name="png-writer")

    def submit(self, image: Image.Image, path: Path) -> None:  # type: ignore[override]
        super().submit(write_png, image, path)

    def __enter__(self) -> ImageWriter:
        return self


# -- sampling --------------------------------------------------------------------------------------------------


@torch.no_grad()
def _run_batch(
    pipe: DiffusionPipeline, batch: list[Job], negative_prompt: str, call: dict[str, Any]
) -> tuple[torch.Tensor, list[Image.Image]]:
    """One pipeline call to latents, then the VAE decode in chunks: unscaled latents (CPU) and images."""
    prompts = [job.prompt for job in batch]
    inputs = {name: [job.inputs[name] for job in batch] for name in batch[0].inputs}
    latents = pipe(
        prompts,
        negative_prompt=[negative_prompt] * len(batch) if negative_prompt else None,
        generator=[torch.Generator().manual_seed(job.seed) for job in batch],
        output_type="latent",
        **inputs,
        **call,
    ).images
    unscaled = latents / pipe.vae.config.scaling_factor
    chunk = max(1, DECODE_PIXELS // (call["height"] * call["width"]))
    images: list[Image.Image] = []
    for part in unscaled.split(chunk):
        decoded = pipe.vae.decode(part.to(pipe.vae.dtype), return_dict=False)[0]
        images += pipe.image_processor.postprocess(decoded, output_type="pil")
    return unscaled.float().cpu(), images


def _free_cuda_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def sample(
    pipe: DiffusionPipeline,
    jobs: Iterable[Job],
    *,
    height: int,
    width: int,
    num_inference_steps: int,
    guidance_scale: float,
    negative_prompt: str = "",
    batch_size: int | str = AUTO,
    batch_size_key: str = "batch_size",
    keep_images: bool = True,
    keep_latents: bool = False,
    call_kwargs: Mapping[str, Any] | None = None,
    desc: str = "sampling",
    progress: bool = True,
) -> dict[Hashable, Sample]:
    """Sample every job; return ``{job.key: Sample}`` in job order once every PNG is written.

    ``batch_size``: ``auto`` (:func:`auto_batch_size`) or images per pipeline call (``batch_size_key`` names the
    setting in errors). ``keep_images`` / ``keep_latents``: what the returned samples hold (a job with a ``path``
    is written either way). ``call_kwargs``: further pipeline arguments shared by all jobs (ControlNet scales).
    """
    jobs = list(jobs)
    keys = [job.key for job in jobs]
    if len(set(keys)) != len(keys):
        raise StageError(f"{desc}: job keys must be unique ({len(keys) - len(set(keys))} repeated)")
    if any(set(job.inputs) != set(jobs[0].inputs) for job in jobs):
        raise StageError(f"{desc}: every job must give the same per-image inputs")
    size = resolve_batch_size(batch_size, pipe, height, width, guidance_scale, batch_size_key)
    call = {
        "height": height,
        "width": width,
        "num_inference_steps": num_inference_steps,
        "guidance_scale": guidance_scale,
        **(call_kwargs or {}),
    }
    pipe.set_progress_bar_config(disable=True)
    sync_qkv_fusion(pipe)
    log.info("%s: %d images, up to %d per call (batch size %s)", desc, len(jobs), size, batch_size)
    results: dict[Hashable, Sample] = {}
    queue = deque(_batches(jobs, size))
    bar = tqdm(
        total=len(jobs),
        desc=desc,
        unit="img",
        disable=not progress,
        mininterval=progress_interval(),
    )
    with phase("sampling"), bar, ImageWriter() as writer:
        while queue:
            batch = queue.popleft()
            try:
                latents, images = _run_batch(pipe, batch, negative_prompt, call)
            except torch.cuda.OutOfMemoryError as err:
                if len(batch) == 1:
                    raise StageError(
                        f"{desc}: out of GPU memory at one image per call ({height}x{width}); free the GPU or "
                        f"lower the resolution"
                    ) from err
                oom = True
            else:
                oom = False
            if oom:  # outside the except block: its traceback no longer holds the failed call's tensors
                _free_cuda_memory()
                size = max(1, len(batch) // 2)
                log.warning(
                    "%s: out of GPU memory at %d images per call; going on at %d", desc, len(batch), size
                )
                queue = deque(_batches(batch, size) + _batches([j for b in queue for j in b], size))
                continue
            for job, latent, image in zip(batch, latents, images, strict=True):
                if job.path is not None:
                    writer.submit(image, job.path)
                results[job.key] = Sample(image if keep_images else None, latent if keep_latents else None)
            bar.update(len(batch))
    return {key: results[key] for key in keys}
