"""The shared sampler: images independent of batching and equal to plain diffusers calls, prompts mixed in a batch,
out-of-memory halving, the batch-size setting, background PNG writes and the speed levers."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from omegaconf.errors import InterpolationResolutionError
from PIL import Image

from stages import class_images
from stages.compose import compose
from stages.lib.config.loader import build_section, load_config
from stages.lib.config.schema import ComputeConfig, PipelineConfig
from stages.lib.errors import ConfigError, StageError
from stages.lib.models.loading import load_pipeline
from stages.lib.sampling import sampler
from stages.lib.sampling.sampler import (
    AUTO,
    ImageWriter,
    Job,
    apply_levers,
    auto_batch_size,
    parse_batch_size,
    prepare_for_sampling,
    sample,
)

from .conftest import PROJECT_ROOT, untrained_base

PROMPTS = [
    "a photo of man face",
    "anime style portrait of sks man face",
    "a photo of sks man face in a forest",
]
CALL = {"height": 64, "width": 64, "num_inference_steps": 3, "guidance_scale": 3.0}
# image k: prompt k % 3, so every batch of two or more mixes prompts
JOBS = [Job(PROMPTS[k % 3], 100 + k, k) for k in range(7)]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return untrained_base(tmp_path_factory.mktemp("sampling"))


@pytest.fixture(scope="module")
def pipe(base_dir: Path) -> StableDiffusionPipeline:
    return load_pipeline(base_dir)


@pytest.fixture(scope="module")
def plain(pipe: StableDiffusionPipeline) -> dict[int, tuple[np.ndarray, torch.Tensor]]:
    """What the code before the sampler gave: one plain diffusers call per image, its generator seeded alike."""
    pipe.set_progress_bar_config(disable=True)
    out = {}
    for job in JOBS:
        image = pipe(job.prompt, generator=torch.Generator().manual_seed(job.seed), **CALL).images[0]
        latent = pipe(
            job.prompt, generator=torch.Generator().manual_seed(job.seed), output_type="latent", **CALL
        ).images[0]
        out[job.key] = (_pixels(image), latent / pipe.vae.config.scaling_factor)
    return out


@pytest.fixture(scope="module")
def by_batch_size(pipe: StableDiffusionPipeline) -> dict[Any, dict]:
    return {b: sample(pipe, JOBS, batch_size=b, keep_latents=True, **CALL) for b in (1, 3, AUTO)}


class Recorder:
    """The pipeline, recording the prompts of each call and running out of memory above ``limit`` images."""

    def __init__(self, pipe: StableDiffusionPipeline, limit: int = 1000) -> None:
        self._pipe, self.limit, self.calls = pipe, limit, []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pipe, name)

    def __call__(self, prompts: list[str], **kwargs: Any) -> Any:
        self.calls.append(list(prompts))
        if len(prompts) > self.limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return self._pipe(prompts, **kwargs)


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def _max_diff(result: dict, reference: dict) -> tuple[int, float]:
    """Largest grey-level difference of the images and largest difference of the latents."""
    images = max(int(np.abs(_pixels(result[k].image) - reference[k][0]).max()) for k in reference)
    latents = max(float((result[k].latent - reference[k][1]).abs().max()) for k in reference)
    return images, latents


def test_images_and_latents_do_not_depend_on_batch_size_and_equal_plain_calls(pipe, plain, by_batch_size):
    assert sampler.auto_batch_size(pipe, 64, 64, 3.0) >= len(JOBS), "auto: one call for the tiny default"
    assert _max_diff(by_batch_size[1], plain) == (0, 0.0), "one image per call is the plain call exactly"
    for size in (3, AUTO):
        # batched matmuls round the last float bits differently: within one grey level
        images, latents = _max_diff(by_batch_size[size], plain)
        assert images <= 1 and latents < 1e-4, (size, images, latents)
    assert list(by_batch_size[3]) == [job.key for job in JOBS]
    assert (
        by_batch_size[1][0].latent.shape == (4, 16, 16) and by_batch_size[1][0].latent.dtype == torch.float32
    )


def test_one_call_mixes_prompts(pipe, by_batch_size) -> None:
    recorder = Recorder(pipe)
    result = sample(recorder, JOBS, batch_size=3, keep_latents=True, **CALL)
    assert [len(c) for c in recorder.calls] == [3, 2, 2], "7 images at 3: balanced batches"
    assert recorder.calls[0] == PROMPTS
    images, latents = _max_diff(
        result, {k: (_pixels(s.image), s.latent) for k, s in by_batch_size[3].items()}
    )
    assert (images, latents) == (0, 0.0)


def test_out_of_memory_halves_the_batch_and_loses_or_changes_no_image(pipe, tmp_path) -> None:
    jobs = [Job(j.prompt, j.seed, j.key, tmp_path / f"{j.key}.png") for j in JOBS]
    recorder = Recorder(pipe, limit=2)
    result = sample(recorder, jobs, batch_size=4, **CALL)
    assert [len(c) for c in recorder.calls] == [4, 2, 2, 2, 1], "4 fails; its halves and the rest go on at 2"
    reference = sample(pipe, JOBS, batch_size=2, **CALL)  # the same batches of 2, 2, 2, 1 without the failure
    assert all(np.array_equal(_pixels(result[k].image), _pixels(reference[k].image)) for k in reference)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"{j.key}.png" for j in JOBS)
    with pytest.raises(StageError, match="out of GPU memory at one image per call"):
        sample(Recorder(pipe, limit=0), JOBS[:2], batch_size=2, **CALL)


def test_batches_are_balanced_in_job_order() -> None:
    sizes = [len(b) for b in sampler._batches(list(range(40)), 32)]
    assert sizes == [20, 20] and [len(b) for b in sampler._batches(list(range(7)), 3)] == [3, 2, 2]
    assert sum(sampler._batches(list(range(10)), 4), []) == list(range(10))


def test_auto_batch_size_on_cuda_follows_free_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    gib = 2**30
    free = {"bytes": 80 * gib}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free["bytes"], 80 * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 0)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 0)
    fake = SimpleNamespace(
        _execution_device=torch.device("cuda", 0), unet=SimpleNamespace(dtype=torch.float16)
    )
    assert auto_batch_size(fake, 512, 512, 7.5) == sampler.MAX_AUTO_BATCH
    free["bytes"] = 8 * gib  # (8 - 1) GiB at 0.6 GiB an image
    assert auto_batch_size(fake, 512, 512, 7.5) == 11
    assert auto_batch_size(fake, 768, 768, 7.5) == 5  # 2.25x the pixels
    fake.unet.dtype = torch.float32
    assert auto_batch_size(fake, 512, 512, 7.5) == 5
    free["bytes"] = gib
    assert auto_batch_size(fake, 512, 512, 7.5) == 1
    cpu = SimpleNamespace(_execution_device=torch.device("cpu"))
    assert auto_batch_size(cpu, 64, 64, 3.0) == 32 and auto_batch_size(cpu, 512, 512, 7.5) == 1


@pytest.mark.parametrize(
    ("value", "expected"), [("auto", AUTO), (" AUTO ", AUTO), ("16", 16), (3, 3), ("1", 1)]
)
def test_batch_size_setting_accepts_auto_or_a_positive_integer(value, expected) -> None:
    assert parse_batch_size(value, "infer.batch_size") == expected


@pytest.mark.parametrize("value", ["abc", "0", "-2", "1.5", "", 0, -1, True, 2.0])
def test_batch_size_setting_errors_name_the_key(value) -> None:
    message = f"infer.batch_size={value!r}: use auto or a positive integer"
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        parse_batch_size(value, "infer.batch_size")


def test_batch_size_settings_are_checked_when_the_config_is_read(tmp_path: Path) -> None:
    assert (PipelineConfig().infer.batch_size, PipelineConfig().class_images.sample_batch_size) == (
        AUTO,
        AUTO,
    )
    cfg = load_config(compose(tmp_path / "p.yaml", ["infer.batch_size=16"], root=PROJECT_ROOT))
    assert cfg.infer.batch_size == "16"  # what `dvc exp run -S infer.batch_size=16` gives
    with pytest.raises(ConfigError, match=r"^class_images\.sample_batch_size='abc': use auto"):
        build_section("class_images", {"sample_batch_size": "abc"})
    with pytest.raises(ConfigError, match=r"^infer\.batch_size='0': use auto or a positive integer$"):
        build_section("infer", {"batch_size": "0"})
    with pytest.raises(InterpolationResolutionError, match=r"infer\.batch_size='0': use auto"):
        compose(tmp_path / "q.yaml", ["infer.batch_size=0"], root=PROJECT_ROOT)  # `dvc exp run -S` stops


def test_a_failed_background_write_is_raised_naming_the_file(pipe, tmp_path) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text(
        "a file where a folder should be"
    )  # (a read-only folder stops no one when run as root)
    bad = blocker / "01.png"
    jobs = [Job(PROMPTS[0], 1, 0, tmp_path / "ok" / "00.png"), Job(PROMPTS[0], 2, 1, bad)]
    with pytest.raises(StageError, match=f"^{re.escape(str(bad))}: cannot write the image"):
        sample(pipe, jobs, batch_size=2, **CALL)
    assert (tmp_path / "ok" / "00.png").is_file(), "the other write still finished"
    assert not list((tmp_path / "ok").glob(".*"))
    with pytest.raises(StageError, match=re.escape(str(bad))), ImageWriter() as writer:
        writer.submit(Image.new("RGB", (8, 8)), bad)  # raised here if already failed, else on leaving


def test_class_images_auto_equal_one_per_call(pipe, tmp_path) -> None:
    cfg = PipelineConfig()
    cfg.class_images = dataclasses.replace(
        cfg.class_images, num_inference_steps=3, guidance_scale=3.0, seed=5
    )
    files = {}
    for size in (1, AUTO):
        cfg.class_images.sample_batch_size = size
        out = tmp_path / str(size)
        out.mkdir()
        class_images.write_images(pipe, cfg, out, [0, 2, 3], 64)
        files[size] = {p.name: _pixels(Image.open(p)) for p in sorted(out.iterdir())}
    assert list(files[1]) == [class_images.image_name(i) for i in (0, 2, 3)] == list(files[AUTO])
    assert max(int(np.abs(files[1][k] - files[AUTO][k]).max()) for k in files[1]) <= 1


def test_levers_stay_off_on_cpu_and_within_tolerance_when_forced(base_dir, plain) -> None:
    levered = load_pipeline(base_dir)
    assert prepare_for_sampling(levered, ComputeConfig(channels_last=True, fuse_qkv=True)) is levered
    assert not sampler._is_fused(levered.unet), "levers are for CUDA: on the CPU none speeds the tiny model"
    apply_levers(levered, channels_last=True, fuse_qkv=True)
    assert sampler._is_fused(levered.unet) and sampler._is_fused(levered.vae)
    assert levered.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    fused = sample(levered, JOBS[:3], batch_size=1, keep_latents=True, **CALL)
    images, latents = _max_diff(fused, {k: plain[k] for k in fused})
    assert images <= 1 and latents < 1e-4, (images, latents)
    # fused attention would bypass LoRA layers on to_q/to_k/to_v: unfused while an adapter is loaded
    from peft import LoraConfig

    lora = LoraConfig(r=4, target_modules=["to_q", "to_k", "to_v"], init_lora_weights=False)
    levered.unet.add_adapter(lora, adapter_name="probe")
    with_lora = sample(levered, JOBS[:1], batch_size=1, **CALL)
    assert not sampler._is_fused(levered.unet)
    assert np.abs(_pixels(with_lora[0].image) - plain[0][0]).max() > 8, "the adapter changes the image"
    levered.unet.unload_lora()
    again = sample(levered, JOBS[:1], batch_size=1, **CALL)
    assert sampler._is_fused(levered.unet)
    assert np.array_equal(_pixels(again[0].image), _pixels(fused[0].image))
