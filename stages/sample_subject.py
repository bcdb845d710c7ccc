"""Stage `sample_subject`: draw the embedded sample subject, one consistent stylised person, offline.

Every "photo" shows the same identity (``SUBJECT``) with a varied pose, scale, position, background and size,
saved as a mix of JPEG and PNG; some JPEGs are stored sideways with an EXIF orientation tag so that prep's
EXIF handling is exercised. Image ``i`` depends only on ``(seed, i)``: same seed, identical bytes.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from stages.lib.cli import stage_main
from stages.lib.config import ConfigError
from stages.lib.outputs import atomic_dir
from stages.lib.schema import PipelineConfig, SampleSubjectConfig

RGB = tuple[int, int, int]
SUPERSAMPLE = 3
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


@dataclass(frozen=True)
class FaceAttributes:
    """What a drawn face looks like; one instance is one identity."""

    skin: RGB = (198, 140, 100)
    hair: RGB = (170, 68, 28)
    hair_style: str = "curly"  # curly | short | long | bald
    eyes: RGB = (60, 140, 70)
    glasses: RGB | None = (20, 20, 24)
    beard: str = "full"  # full | goatee | none
    lips: RGB = (150, 70, 60)
    face_width: float = 0.74  # face ellipse width / height


SUBJECT = FaceAttributes()  # tan skin, ginger curly hair and beard, green eyes, round black glasses


def _shade(colour: RGB, factor: float) -> RGB:
    return tuple(int(min(255, max(0, c * factor))) for c in colour)  # type: ignore[return-value]


class _Pen:
    """Draws in face units: x in face half-widths from the centre (yaw-shifted), y in face half-heights."""

    def __init__(self, draw: ImageDraw.ImageDraw, cx: float, cy: float, hw: float, hh: float, yaw: float):
        self.draw, self.cx, self.cy, self.hw, self.hh, self.yaw = draw, cx, cy, hw, hh, yaw

    def xy(self, u: float, v: float, depth: float = 1.0) -> tuple[float, float]:
        """Point at face coordinates (u, v); features with more ``depth`` move more with yaw."""
        u = u * (1 - 0.3 * abs(self.yaw)) + self.yaw * 0.45 * depth
        return self.cx + u * self.hw, self.cy + v * self.hh

    def ellipse(self, u: float, v: float, ru: float, rv: float, depth: float = 1.0, **kw: object) -> None:
        x, y = self.xy(u, v, depth)
        rx, ry = ru * self.hw * (1 - 0.3 * abs(self.yaw)), rv * self.hh
        self.draw.ellipse((x - rx, y - ry, x + rx, y + ry), **kw)  # type: ignore[arg-type]

    def line(
        self, points: Sequence[tuple[float, float]], width: float, depth: float = 1.0, **kw: object
    ) -> None:
        self.draw.line([self.xy(u, v, depth) for u, v in points], width=max(1, round(width * self.hw)), **kw)  # type: ignore[arg-type]


def _draw_hair(pen: _Pen, attrs: FaceAttributes, front: bool) -> None:
    """Hair behind the head (``front=False``) or the fringe over the forehead (``front=True``)."""
    colour, dark = attrs.hair, _shade(attrs.hair, 0.75)
    if attrs.hair_style == "curly":
        blobs = [
            (-1.05, -0.35),
            (1.05, -0.35),
            (-0.9, -0.75),
            (0.9, -0.75),
            (-0.5, -1.05),
            (0.5, -1.05),
            (0, -1.12),
        ]
        if front:
            blobs = [(-0.55, -0.82), (-0.15, -0.92), (0.25, -0.9), (0.6, -0.78)]
        for i, (u, v) in enumerate(blobs):
            pen.ellipse(u, v, 0.42, 0.26, depth=0.3, fill=dark if i % 2 else colour)
    elif attrs.hair_style == "long":
        if not front:
            pen.draw.rectangle((*pen.xy(-1.2, -0.6, 0.2), *pen.xy(1.2, 1.4, 0.2)), fill=colour)
        pen.ellipse(0, -0.72 if front else -0.55, 1.08, 0.4 if front else 0.62, depth=0.2, fill=colour)
    elif attrs.hair_style == "short":
        pen.ellipse(0, -0.7 if front else -0.5, 1.02, 0.35 if front else 0.6, depth=0.2, fill=colour)


def _draw_eyes(pen: _Pen, attrs: FaceAttributes) -> None:
    socket = _shade(attrs.skin, 0.7)
    for side in (-1, 1):
        u = side * 0.42
        pen.ellipse(u, -0.15, 0.26, 0.14, fill=socket)
        pen.ellipse(u, -0.12, 0.15, 0.06, fill=(185, 176, 166))
        pen.ellipse(u, -0.12, 0.08, 0.065, depth=1.15, fill=_shade(attrs.eyes, 0.8))
        pen.ellipse(u, -0.12, 0.04, 0.035, depth=1.2, fill=(15, 12, 12))
        pen.line([(u - 0.16, -0.15), (u, -0.185), (u + 0.16, -0.15)], 0.04, fill=(40, 25, 20))
        pen.line([(u - 0.24, -0.33), (u, -0.37), (u + 0.24, -0.32)], 0.09, fill=_shade(attrs.hair, 0.5))
        if attrs.glasses is not None:
            pen.ellipse(u, -0.12, 0.3, 0.16, outline=attrs.glasses, width=max(1, round(0.04 * pen.hw)))
    if attrs.glasses is not None:
        pen.line([(-0.09, -0.14), (0.09, -0.14)], 0.06, fill=attrs.glasses)
        pen.line([(-0.68, -0.14), (-0.98, -0.18)], 0.05, depth=0.5, fill=attrs.glasses)
        pen.line([(0.68, -0.14), (0.98, -0.18)], 0.05, depth=0.5, fill=attrs.glasses)


def _draw_lower_face(pen: _Pen, attrs: FaceAttributes) -> None:
    shadow = _shade(attrs.skin, 0.7)
    pen.line([(0.02, -0.05), (0.1, 0.25), (0.0, 0.3)], 0.05, depth=1.4, fill=shadow)
    for side in (-1, 1):
        pen.ellipse(side * 0.08, 0.3, 0.05, 0.025, depth=1.3, fill=_shade(attrs.skin, 0.45))
    beard = _shade(attrs.hair, 1.4)
    if attrs.beard == "full":
        pen.draw.chord((*pen.xy(-0.95, -0.1, 0.5), *pen.xy(0.95, 1.1, 0.5)), 0, 180, fill=beard)
        pen.ellipse(0, 0.44, 0.34, 0.08, fill=beard)
    elif attrs.beard == "goatee":
        pen.ellipse(0, 0.82, 0.3, 0.2, fill=beard)
    pen.ellipse(0, 0.57, 0.26, 0.075, fill=attrs.lips)
    pen.line([(-0.25, 0.57), (0.25, 0.57)], 0.025, fill=_shade(attrs.lips, 0.5))


def draw_face(attrs: FaceAttributes, size: int, yaw: float = 0.0) -> Image.Image:
    """A head with ``attrs`` on a transparent RGBA square of side ``2 * size``; the face is ``size`` px tall.

    ``yaw`` in [-1, 1] turns the head (features shift sideways); the face centre is the image centre.
    """
    side = 2 * size * SUPERSAMPLE
    image = Image.new("RGBA", (side, side), (0, 0, 0, 0))
    hh = size * SUPERSAMPLE / 2
    pen = _Pen(ImageDraw.Draw(image), side / 2, side / 2, hh * attrs.face_width, hh, yaw)
    _draw_hair(pen, attrs, front=False)
    for s in (-1, 1):
        pen.ellipse(s * 1.0, -0.05, 0.14, 0.2, depth=0.1 - 0.5 * s * yaw, fill=_shade(attrs.skin, 0.85))
    pen.ellipse(0, 0, 1.0, 1.0, depth=0.15, fill=_shade(attrs.skin, 0.88))
    pen.ellipse(0, -0.04, 0.9, 0.92, depth=0.2, fill=attrs.skin)
    _draw_eyes(pen, attrs)
    _draw_lower_face(pen, attrs)
    _draw_hair(pen, attrs, front=True)
    return image.resize((2 * size, 2 * size), Image.Resampling.LANCZOS)


def _random_colour(rng: np.random.Generator, low: int = 30, high: int = 230) -> RGB:
    return tuple(int(c) for c in rng.integers(low, high, 3))  # type: ignore[return-value]


def _background(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A vertical gradient with a few soft shapes (a room, a wall, a park...)."""
    top, bottom = np.array(_random_colour(rng)), np.array(_random_colour(rng))
    t = np.linspace(0, 1, height)[:, None, None]
    image = Image.fromarray(np.broadcast_to(top * (1 - t) + bottom * t, (height, width, 3)).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(2, 6))):
        x0, y0 = rng.integers(0, width), rng.integers(0, height)
        w, h = rng.integers(width // 8, width // 2), rng.integers(height // 8, height // 2)
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape((x0, y0, x0 + w, y0 + h), fill=_random_colour(rng))
    return image.filter(ImageFilter.GaussianBlur(max(1, width // 60)))


def compose_photo(attrs: FaceAttributes, rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """One RGB "photo": background, shoulders and the head of ``attrs`` at a random pose, scale and place."""
    image = _background(rng, width, height)
    face = int(min(width, height) * rng.uniform(0.3, 0.55))
    cx = rng.uniform(0.35, 0.65) * width
    cy = rng.uniform(0.3, 0.55) * height
    draw = ImageDraw.Draw(image)
    shirt = _random_colour(rng)
    draw.ellipse((cx - 1.1 * face, cy + 0.75 * face, cx + 1.1 * face, cy + 2.6 * face), fill=shirt)
    draw.rectangle(
        (cx - 0.18 * face, cy + 0.3 * face, cx + 0.18 * face, cy + 0.9 * face), fill=_shade(attrs.skin, 0.8)
    )
    head = draw_face(attrs, face, yaw=float(rng.uniform(-0.35, 0.35)))
    head = head.rotate(float(rng.uniform(-6, 6)), Image.Resampling.BICUBIC)
    image.paste(head, (round(cx - face), round(cy - face)), head)
    light = rng.uniform(0.85, 1.15)
    noise = rng.normal(0, 4, (height, width, 3))
    return Image.fromarray(
        np.clip(np.asarray(image, dtype=np.float32) * light + noise, 0, 255).astype(np.uint8)
    )


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
            f"{MIN_IMAGE_SIDE} <= min_size <= max_size (and min_size >= prep.resolution unless prep.allow_upscale)."
        )


def write_subject(cfg: SampleSubjectConfig, folder: Path, attrs: FaceAttributes = SUBJECT) -> list[Path]:
    """Write ``cfg.num_images`` photos of ``attrs`` into ``folder``; returns their paths."""
    paths = []
    for i in range(cfg.num_images):
        rng = np.random.default_rng([cfg.seed, i])
        width, height = (int(v) for v in rng.integers(cfg.min_size, cfg.max_size + 1, 2))
        photo = compose_photo(attrs, rng, width, height)
        if i % 3 == 2:
            paths.append(save_photo(photo, folder / f"subject_{i:03d}.png"))
        else:
            orientation = JPEG_ORIENTATIONS[(i // 3) % len(JPEG_ORIENTATIONS)]
            quality = int(rng.integers(85, 96))
            paths.append(save_photo(photo, folder / f"subject_{i:03d}.jpg", orientation, quality))
    return paths


def run(cfg: PipelineConfig, output_dir: Path) -> list[Path]:
    """Replace ``output_dir`` with a freshly drawn sample subject; returns the written files."""
    check_config(cfg.sample_subject)
    with atomic_dir(output_dir) as tmp:
        names = [p.name for p in write_subject(cfg.sample_subject, tmp)]
    return [output_dir / name for name in names]


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: ``python -m stages.sample_subject --out data/sample_subject``."""

    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--out", type=Path, default=Path("data/sample_subject"), help="output folder")

    return stage_main(__doc__.splitlines()[0], add_arguments, lambda cfg, args: run(cfg, args.out), argv)


if __name__ == "__main__":
    raise SystemExit(main())
