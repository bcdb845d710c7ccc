"""Stage `sample_subject`: draw the embedded sample subject, one consistent stylised person, offline.

Every "photo" shows the same identity (``SUBJECT``, which the miniature world's pretraining data never shows) with
a varied pose, scale, position, world scene (stages/lib/miniature/world.py) and size,
saved as a mix of JPEG and PNG; some JPEGs are stored sideways with an EXIF orientation tag so that prep's
EXIF handling is exercised. A photo taken in a scene gets a caption naming it (``subject_002.txt``: "a photo of sks
man face in a kitchen"), as a user would caption such photos for DreamBooth, so that training binds ``sks`` to the
person rather than to the scenes behind them. Image ``i`` depends only on ``(seed, i)``: same seed, identical
bytes.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image

from stages.lib.config.schema import PipelineConfig, SampleSubjectConfig
from stages.lib.errors import ConfigError
from stages.lib.miniature.face_render import SUBJECT, FaceAttributes
from stages.lib.miniature.world import SCENE_SUFFIX, apply_style, paint_scene, place_person
from stages.lib.runtime.cli import stage_main
from stages.lib.runtime.outputs import atomic_dir
from stages.lib.runtime.threads import map_in_threads

MIN_IMAGE_SIDE = 64  # the tiny profile's prep resolution
EXIF_ORIENTATION_TAG = 0x0112
# Stored = transpose(upright) so that ImageOps.exif_transpose(stored) == upright.
_ORIENTATION_ENCODE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}
JPEG_ORIENTATIONS = (1, 6, 3, 8)  # cycled over the JPEG files


SCENE_CYCLE = ("plain", "plain", "kitchen", "forest", "night city")  # photo i is taken in SCENE_CYCLE[i % 5]


def compose_photo(
    attrs: FaceAttributes, rng: np.random.Generator, width: int, height: int, scene: str = "plain"
) -> Image.Image:
    """One RGB "photo" in a world scene: shoulders and the head of ``attrs`` at a random pose, scale and place."""
    image = paint_scene(scene, rng, width, height)
    face = int(min(width, height) * rng.uniform(0.3, 0.55))
    cx = rng.uniform(0.35, 0.65) * width
    cy = rng.uniform(0.3, 0.55) * height
    return apply_style(place_person(image, attrs, rng, cx, cy, face), "photo", rng)


def encode_orientation(upright: Image.Image, orientation: int) -> Image.Image:
    """The pixels a camera stores for ``upright`` when it writes EXIF ``orientation`` (1..8)."""
    op = _ORIENTATION_ENCODE.get(orientation)
    return upright if op is None else upright.transpose(op)


def save_photo(image: Image.Image, path: Path, orientation: int = 1, quality: int = 92) -> Path:
    """Save as PNG or JPEG by suffix; a JPEG with ``orientation`` != 1 is stored sideways with the EXIF tag."""
    if path.suffix.lower() == ".png":
        image.save(path, format="PNG")
        return path
    exif = Image.Exif()
    if orientation != 1:
        exif[EXIF_ORIENTATION_TAG] = orientation
    encode_orientation(image, orientation).save(path, format="JPEG", quality=quality, exif=exif.tobytes())
    return path


def check_config(cfg: SampleSubjectConfig) -> None:
    """Reject sizes prep could not use, naming the key and the fix."""
    if cfg.num_images < 1:
        raise ConfigError(f"sample_subject.num_images={cfg.num_images}: must be at least 1.")
    if cfg.min_size < MIN_IMAGE_SIDE or cfg.max_size < cfg.min_size:
        raise ConfigError(
            f"sample_subject.min_size={cfg.min_size}, sample_subject.max_size={cfg.max_size}: need "
            f"{MIN_IMAGE_SIDE} <= min_size <= max_size (both are raised to prep.resolution where they are smaller)."
        )


def scene_caption(instance_prompt: str, scene: str) -> str | None:
    """The caption of a photo taken in ``scene``: the instance prompt naming it; None on a plain background."""
    return f"{instance_prompt}{SCENE_SUFFIX[scene]}" if SCENE_SUFFIX[scene] else None


def write_subject(
    cfg: SampleSubjectConfig,
    folder: Path,
    attrs: FaceAttributes = SUBJECT,
    instance_prompt: str | None = None,
) -> list[Path]:
    """Write ``cfg.num_images`` photos of ``attrs`` into ``folder`` (with their scene captions when an
    ``instance_prompt`` is given); returns the photos' paths."""

    def write(i: int) -> Path:  # photo i draws from its own generator: the threads change nothing
        rng = np.random.default_rng([cfg.seed, i])
        width, height = (int(v) for v in rng.integers(cfg.min_size, cfg.max_size + 1, 2))
        scene = SCENE_CYCLE[i % len(SCENE_CYCLE)]
        photo = compose_photo(attrs, rng, width, height, scene)
        if i % 3 == 2:
            path = save_photo(photo, folder / f"subject_{i:03d}.png")
        else:
            orientation = JPEG_ORIENTATIONS[(i // 3) % len(JPEG_ORIENTATIONS)]
            quality = int(rng.integers(85, 96))
            path = save_photo(photo, folder / f"subject_{i:03d}.jpg", orientation, quality)
        caption = scene_caption(instance_prompt, scene) if instance_prompt else None
        if caption:
            path.with_suffix(".txt").write_text(caption + "\n")
        return path

    return map_in_threads(write, range(cfg.num_images))


def at_prep_resolution(cfg: PipelineConfig) -> SampleSubjectConfig:
    """The sample's sizes raised to what prep needs: a short side of at least ``prep.resolution`` (unless prep may
    upscale), the largest at least 1.5 times that, so every profile's prep accepts the sample subject."""
    sample = cfg.sample_subject
    if cfg.prep.allow_upscale or sample.min_size >= cfg.prep.resolution:
        return sample
    low = cfg.prep.resolution
    return replace(sample, min_size=low, max_size=max(sample.max_size, low * 3 // 2))


def run(cfg: PipelineConfig, output_dir: Path) -> list[Path]:
    """Replace ``output_dir`` with a freshly drawn sample subject; returns the written photos."""
    check_config(cfg.sample_subject)
    sample = at_prep_resolution(cfg)
    prompt = cfg.data.instance_prompt if sample.captions else None
    with atomic_dir(output_dir) as tmp:
        names = [p.name for p in write_subject(sample, tmp, instance_prompt=prompt)]
    return [output_dir / name for name in names]


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: ``python -m stages.sample_subject --out data/sample_subject``."""

    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--out", type=Path, default=Path("data/sample_subject"), help="output folder")

    return stage_main(__doc__.splitlines()[0], add_arguments, lambda cfg, args: run(cfg, args.out), argv)


if __name__ == "__main__":
    raise SystemExit(main())
