"""The inference function: same seed -> same images, the file naming scheme, batching, scheduler override."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from diffusers import StableDiffusionPipeline
from PIL import Image
from safetensors.torch import load_file

from stages.lib.errors import StageError
from stages.lib.models.loading import load_pipeline
from stages.lib.sampling.inference import (
    LATENTS_FILE,
    Generation,
    generate,
    image_seed,
    prompt_slugs,
    short_labels,
    slugify,
)

from .conftest import untrained_base

PROMPTS = ["a photo of sks man face in a kitchen", "anime style portrait of sks man face"]
SETTINGS = {"seed": 3, "height": 64, "width": 64, "num_inference_steps": 3, "num_images_per_prompt": 2}


@pytest.fixture(scope="module")
def pipe(tmp_path_factory: pytest.TempPathFactory) -> StableDiffusionPipeline:
    return load_pipeline(untrained_base(tmp_path_factory.mktemp("inference")))


@pytest.fixture(scope="module")
def first(pipe: StableDiffusionPipeline, tmp_path_factory: pytest.TempPathFactory) -> tuple[Generation, Path]:
    out = tmp_path_factory.mktemp("out")
    return generate(pipe, PROMPTS, **SETTINGS, batch_size=4, out_dir=out, variant="base"), out


def _arrays(gen: Generation) -> list[np.ndarray]:
    return [np.asarray(im, dtype=np.int16) for prompt in PROMPTS for im in gen.images[prompt]]


def test_same_seed_gives_identical_images_and_other_seeds_differ(pipe, first) -> None:
    again = generate(pipe, PROMPTS, **SETTINGS, batch_size=4)
    assert all(np.array_equal(a, b) for a, b in zip(_arrays(first[0]), _arrays(again), strict=True))
    other = generate(pipe, PROMPTS[:1], **{**SETTINGS, "seed": 4}, batch_size=4)
    assert not np.array_equal(_arrays(first[0])[0], np.asarray(other.images[PROMPTS[0]][0], np.int16))
    assert len({a.tobytes() for a in _arrays(first[0])}) == 4, "each (prompt, index) has its own generator"
    assert first[0].seeds[PROMPTS[1]] == [image_seed(3, 1, 0), image_seed(3, 1, 1)] == [1003, 1004]


def test_files_follow_variant_slug_index_naming(first) -> None:
    gen, out = first
    slugs = prompt_slugs(PROMPTS)
    assert slugs == ["a-photo-of-sks-man-face-in-a-kitchen", "anime-style-portrait-of-sks-man-face"]
    for prompt, slug in zip(PROMPTS, slugs, strict=True):
        expected = [out / "base" / slug / f"{i:02d}.png" for i in range(2)]
        assert gen.files[prompt] == expected
        for path, image in zip(expected, gen.images[prompt], strict=True):
            assert np.array_equal(np.asarray(Image.open(path)), np.asarray(image))
    latents = load_file(out / "base" / LATENTS_FILE)
    assert sorted(latents) == sorted(f"{s}/{i:02d}" for s in slugs for i in range(2))
    assert latents[f"{slugs[0]}/00"].shape == (4, 16, 16)


def test_batching_does_not_change_images(pipe, first) -> None:
    one_by_one = generate(pipe, PROMPTS, **SETTINGS, batch_size=1)
    # batched matmuls round differently in the last float bits; images agree to within one grey level
    diffs = [np.abs(a - b).max() for a, b in zip(_arrays(first[0]), _arrays(one_by_one), strict=True)]
    assert max(diffs) <= 1, diffs


def test_scheduler_override_changes_sampling_and_is_restored(pipe, first) -> None:
    original = pipe.scheduler
    dpm = generate(pipe, PROMPTS[:1], **SETTINGS, scheduler="DPMSolverMultistepScheduler")
    assert pipe.scheduler is original
    assert not np.array_equal(_arrays(first[0])[0], np.asarray(dpm.images[PROMPTS[0]][0], np.int16))
    with pytest.raises(StageError, match=r"infer\.scheduler='Nope'.*DPMSolverMultistepScheduler"):
        generate(pipe, PROMPTS[:1], **SETTINGS, scheduler="Nope")


def test_slugs_are_file_safe_deterministic_and_unique() -> None:
    assert slugify("A photo of SKS man, face!  (night city)") == "a-photo-of-sks-man-face-night-city"
    assert slugify("***") == "prompt" and len(slugify("x" * 500)) == 60
    assert prompt_slugs(["a cat!", "a cat?", "a dog"]) == ["a-cat", "a-cat-1", "a-dog"]
    assert short_labels(["a photo of sks in a kitchen", "a photo of sks in a forest"]) == [
        "kitchen",
        "forest",
    ]


def test_bad_requests_fail_clearly(pipe) -> None:
    with pytest.raises(StageError, match="more than once"):
        generate(pipe, [PROMPTS[0], PROMPTS[0]], **SETTINGS)
    with pytest.raises(StageError, match="infer.prompts is empty"):
        generate(pipe, [], **SETTINGS)


def test_class_probe_images_ride_in_the_prompt_lists_calls(pipe, tmp_path: Path, monkeypatch) -> None:
    """infer's class-prompt images join the prompt list's queue: one pipeline call for both, the same pixels as a
    call of their own with the class seeds, files under class_prompt/, and the latents file unchanged."""
    from stages.lib.sampling import inference

    calls: list[int] = []
    original = inference.sample

    def counting(p, jobs, **kw):
        calls.append(len(jobs))
        return original(p, jobs, **kw)

    monkeypatch.setattr(inference, "sample", counting)
    gen = generate(pipe, PROMPTS, **SETTINGS, batch_size=8, out_dir=tmp_path, variant="base",
                   class_probe=("a photo of man face", 3))  # fmt: skip
    assert calls == [len(PROMPTS) * 2 + 3], "one queue: prompts and class images together"
    assert gen.class_files == [tmp_path / "base" / "class_prompt" / f"{i:02d}.png" for i in range(3)]
    alone = generate(pipe, ["a photo of man face"], **{**SETTINGS, "seed": 3 + inference.CLASS_PROBE_SEED,
                     "num_images_per_prompt": 3}, batch_size=3)  # fmt: skip
    for path, image in zip(gen.class_files, alone.images["a photo of man face"], strict=True):
        diff = np.abs(np.asarray(Image.open(path), np.int16) - np.asarray(image, np.int16)).max()
        assert diff <= 1, (path, diff)
    assert sorted(load_file(tmp_path / "base" / LATENTS_FILE)) == sorted(
        f"{s}/{i:02d}" for s in prompt_slugs(PROMPTS) for i in range(2)
    ), "the class images are not in the prompt list's latents"
    no_probe = generate(pipe, PROMPTS[:1], **SETTINGS, batch_size=8, class_probe=("a photo of man face", 0))
    assert no_probe.class_files == []
