"""The inference function: seeded, batched text-to-image generation with a predictable file layout.

Image ``i`` of prompt ``p`` is drawn from its own generator seeded with ``image_seed(seed, p, i)``, so the same seed
gives the same images whatever the batch size, and every variant of a comparison starts from the same noise.
Files go to ``<out>/<variant>/<prompt-slug>/<i:02d>.png``; the final (unscaled) VAE latents of a variant go to
``<out>/<variant>/latents.safetensors`` under the keys ``<prompt-slug>/<i:02d>``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
from diffusers import StableDiffusionPipeline
from PIL import Image
from safetensors.torch import load_file, save_file

from stages.lib.errors import StageError
from stages.lib.imaging.images import make_grid
from stages.lib.sampling.sampler import AUTO, Job, Sample, sample

SEED_STRIDE = 1000  # image i of prompt p uses seed + p * SEED_STRIDE + i
LATENTS_FILE = "latents.safetensors"
INDEX_FILE = "index.json"
MAX_SLUG = 60
MIN_GRID_CELL = 128  # grid cells are at least this wide so that captions stay readable


def slugify(text: str, max_len: int = MAX_SLUG) -> str:
    """A lowercase file-name-safe slug: runs of other characters become one '-'; never empty."""
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:max_len].rstrip("-")
    return slug or "prompt"


def prompt_slugs(prompts: Sequence[str]) -> list[str]:
    """One slug per prompt; a slug already taken gets the suffix ``-<position>``."""
    slugs: list[str] = []
    for position, prompt in enumerate(prompts):
        slug = slugify(prompt)
        while slug in slugs:
            slug = f"{slug}-{position}"
        slugs.append(slug)
    return slugs


def short_labels(prompts: Sequence[str]) -> list[str]:
    """What tells the prompts apart, for grid captions: words used by more than half of them are dropped."""
    words = [p.lower().split() for p in prompts]
    common = {w for w in set().union(*words) if sum(w in ws for ws in words) * 2 > len(words)}
    return [
        " ".join(w for w in ws if w not in common) or slugify(p) for ws, p in zip(words, prompts, strict=True)
    ]


CLASS_PROBE_DIR = "class_prompt"
CLASS_PROBE_SEED = 10_000_000  # class-prompt images never share a seed with the prompt list's


def image_name(index: int) -> str:
    return f"{index:02d}.png"


def image_seed(seed: int, prompt_index: int, image_index: int) -> int:
    """The generator seed of one image: depends on nothing but the seed and the image's position."""
    return seed + prompt_index * SEED_STRIDE + image_index


SAMPLING_KEYS = (
    "seed",
    "negative_prompt",
    "height",
    "width",
    "num_images_per_prompt",
    "num_inference_steps",
    "guidance_scale",
    "scheduler",
    "batch_size",
)


def sampling_kwargs(cfg: object) -> dict[str, object]:
    """The keyword arguments of :func:`generate` taken from a config with those fields (``cfg.infer``)."""
    return {key: getattr(cfg, key) for key in SAMPLING_KEYS}


@dataclass
class Generation:
    """Images, latents (unscaled, N x C x h x w) and written files, each keyed by prompt in prompt order."""

    images: dict[str, list[Image.Image]] = field(default_factory=dict)
    latents: dict[str, torch.Tensor] = field(default_factory=dict)
    files: dict[str, list[Path]] = field(default_factory=dict)
    seeds: dict[str, list[int]] = field(default_factory=dict)
    class_files: list[Path] = field(default_factory=list)  # the class-prompt probe images, when made


@contextmanager
def using_scheduler(pipe: StableDiffusionPipeline, name: str) -> Iterator[None]:
    """Temporarily swap in the scheduler class ``name`` built from the pipeline's scheduler config."""
    if not name:
        yield
        return
    candidates = {cls.__name__: cls for cls in [type(pipe.scheduler), *pipe.scheduler.compatibles]}
    if name not in candidates:
        raise StageError(
            f"infer.scheduler='{name}' is not a scheduler compatible with this pipeline; "
            f"use one of {', '.join(sorted(candidates))} (or '' to keep {type(pipe.scheduler).__name__})"
        )
    original = pipe.scheduler
    pipe.scheduler = candidates[name].from_config(original.config)
    try:
        yield
    finally:
        pipe.scheduler = original


def _jobs(
    prompts: list[str], seed: int, count: int, folder: Path | None, slugs: list[str] | None = None
) -> list[Job]:
    """Image ``i`` of prompt ``p``: seed ``image_seed(seed, p, i)``, key ``(p, i)``, file ``<folder>/<slug>/``."""
    return [
        Job(
            prompt,
            image_seed(seed, p, i),
            (p, i),
            None if folder is None else folder / (slugs[p] if slugs else "") / image_name(i),
        )
        for p, prompt in enumerate(prompts)
        for i in range(count)
    ]


def _sample(
    pipe: StableDiffusionPipeline, jobs: list[Job], scheduler: str, batch_size: int | str, **settings: Any
) -> dict[Any, Sample]:
    with using_scheduler(pipe, scheduler):
        return sample(pipe, jobs, batch_size=batch_size, batch_size_key="infer.batch_size", **settings)


def generate(
    pipe: StableDiffusionPipeline,
    prompts: Sequence[str],
    *,
    seed: int,
    negative_prompt: str = "",
    height: int = 512,
    width: int = 512,
    num_images_per_prompt: int = 2,
    num_inference_steps: int = 30,
    guidance_scale: float = 7.5,
    scheduler: str = "",
    batch_size: int | str = AUTO,
    out_dir: Path | None = None,
    variant: str = "model",
    class_probe: tuple[str, int] | None = None,
) -> Generation:
    """Generate ``num_images_per_prompt`` images per prompt, ``batch_size`` images per pipeline call (``auto``
    or an int; prompts mixed in a call; the images do not depend on it).

    ``scheduler`` names a diffusers scheduler class built from the pipeline's scheduler config ('' keeps it).
    With ``out_dir``, also write ``<out_dir>/<variant>/<slug>/<i:02d>.png`` and the variant's latents file.
    ``class_probe`` = (class prompt, count): that many class-prompt images too, in the same pipeline calls, into
    ``<out_dir>/<variant>/class_prompt/`` (seeds after the prompts'; listed in ``class_files``, not in the
    latents file).
    """
    prompts = list(prompts)
    _check_request(prompts, num_images_per_prompt)
    slugs = prompt_slugs(prompts)
    folder = None if out_dir is None else Path(out_dir) / variant
    jobs = _jobs(prompts, seed, num_images_per_prompt, folder, slugs)
    probe_jobs = [] if class_probe is None else _class_probe_jobs(*class_probe, seed, folder)
    samples = _sample(
        pipe,
        jobs + probe_jobs,
        scheduler,
        batch_size,
        negative_prompt=negative_prompt,
        height=height,
        width=width,
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        keep_latents=True,
        desc=f"infer {variant}",
    )
    result = Generation(
        images={p: [] for p in prompts},
        seeds={p: [] for p in prompts},
        files={} if folder is None else {p: [] for p in prompts},
    )
    latents: dict[str, list[torch.Tensor]] = {p: [] for p in prompts}
    for job in jobs:
        prompt, done = prompts[job.key[0]], samples[job.key]
        result.images[prompt].append(done.image)
        result.seeds[prompt].append(job.seed)
        latents[prompt].append(done.latent)
        if job.path is not None:
            result.files[prompt].append(job.path)
    result.latents = {prompt: torch.stack(items) for prompt, items in latents.items()}
    if folder is not None:
        tensors = {
            f"{slug}/{i:02d}": latent.contiguous()
            for prompt, slug in zip(prompts, slugs, strict=True)
            for i, latent in enumerate(result.latents[prompt])
        }
        folder.mkdir(parents=True, exist_ok=True)
        save_file(tensors, folder / LATENTS_FILE)
    result.class_files = [job.path for job in probe_jobs if job.path is not None]
    return result


def _class_probe_jobs(class_prompt: str, count: int, seed: int, folder: Path | None) -> list[Job]:
    """``count`` images of the class prompt, keyed ``("class", i)``, into ``<folder>/class_prompt/``."""
    if count <= 0:
        return []
    _check_request([class_prompt], count)
    probe_folder = None if folder is None else folder / CLASS_PROBE_DIR
    return [
        replace(job, key=("class", job.key[1]))
        for job in _jobs([class_prompt], seed + CLASS_PROBE_SEED, count, probe_folder)
    ]


def _check_request(prompts: list[str], num_images_per_prompt: int) -> None:
    """Refuse requests whose images could not be named or seeded unambiguously."""
    if not prompts:
        raise StageError("infer.prompts is empty: give at least one prompt")
    duplicates = sorted({p for p in prompts if prompts.count(p) > 1})
    if duplicates:
        raise StageError(f"infer.prompts lists {duplicates} more than once; remove the duplicates")
    if not 1 <= num_images_per_prompt <= SEED_STRIDE:
        raise StageError(f"infer.num_images_per_prompt={num_images_per_prompt} must be in 1..{SEED_STRIDE}")


@dataclass
class InferIndex:
    """``<root>/index.json``: what was generated -- per variant and prompt the files relative to ``root``."""

    root: Path
    prompts: list[str]
    variants: dict[str, dict[str, list[str]]]
    seeds: dict[str, list[int]]
    settings: dict[str, Any]
    lora_ranks: dict[str, int] = field(default_factory=dict)  # LoRA variant -> rank
    skipped: dict[str, str] = field(default_factory=dict)  # variant -> why it was not generated
    class_prompt: str = ""  # the class prompt sampled per variant (language drift, class diversity)
    class_images: dict[str, list[str]] = field(default_factory=dict)  # variant -> files of the class prompt
    _images: dict[str, dict[str, list[Image.Image]]] = field(default_factory=dict, repr=False)

    @classmethod
    def from_results(cls, root: Path, results: dict[str, Generation], **extra: Any) -> InferIndex:
        """The index of ``generate`` results written under ``root``, with each variant's class-prompt images
        (``extra``: settings, lora_ranks, skipped, class_prompt)."""

        def relative(files: list[Path]) -> list[str]:
            return [f.relative_to(root).as_posix() for f in files]

        first = next(iter(results.values()))
        variants = {
            name: {p: relative(files) for p, files in gen.files.items()} for name, gen in results.items()
        }
        class_images = {name: relative(gen.class_files) for name, gen in results.items() if gen.class_files}
        return cls(root, list(first.images), variants, first.seeds, class_images=class_images, **extra)

    @classmethod
    def load(cls, root: Path) -> InferIndex:
        path = Path(root) / INDEX_FILE
        if not path.is_file():
            raise StageError(f"{path}: missing; run `dvc repro infer` first")
        data = json.loads(path.read_text())
        return cls(Path(root), **{k: data[k] for k in cls.__dataclass_fields__ if k in data and k != "root"})

    def write(self) -> Path:
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("root", "_images")}
        path = self.root / INDEX_FILE
        path.write_text(json.dumps(data, indent=2) + "\n")
        return path

    def files(self, variant: str, prompt: str) -> list[Path]:
        return [self.root / f for f in self.variants[variant][prompt]]

    def images(self, variant: str) -> dict[str, list[Image.Image]]:
        """Prompt -> the variant's images, read once."""
        if variant not in self._images:
            self._images[variant] = {p: [_read(f) for f in self.files(variant, p)] for p in self.prompts}
        return self._images[variant]

    def class_prompt_images(self, variant: str) -> list[Image.Image]:
        """The variant's images of the class prompt (empty when infer.class_prompt_images=0)."""
        return [_read(self.root / f) for f in self.class_images.get(variant, [])]

    def latents(self, variant: str) -> torch.Tensor | None:
        """All latents of a variant (N, C, h, w), or None when the file is absent."""
        path = self.root / variant / LATENTS_FILE
        return torch.stack(list(load_file(path).values())) if path.is_file() else None

    def grid(self, variants: list[str], prompts: list[str]) -> Image.Image:
        """One column per variant; rows: each prompt's images in turn."""
        count = len(self.variants[variants[0]][prompts[0]])
        cells = [(v, self.images(v)[p][i]) for p in prompts for i in range(count) for v in variants]
        return _grid(cells, len(variants))

    def variant_grid(self, variant: str) -> Image.Image:
        """One row per prompt (captioned with what tells the prompts apart); one column per image."""
        labels = dict(zip(self.prompts, short_labels(self.prompts), strict=True))
        cells = [(labels[p], im) for p in self.prompts for im in self.images(variant)[p]]
        return _grid(cells, len(cells) // len(self.prompts))


def _read(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


def _grid(cells: list[tuple[str, Image.Image]], columns: int) -> Image.Image:
    cell = max(MIN_GRID_CELL, max(im.width for _, im in cells))
    return make_grid([im for _, im in cells], columns, [label for label, _ in cells], cell=cell)
