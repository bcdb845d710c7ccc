"""Drawing stylised heads: the one renderer behind the sample subject and the miniature world of faces."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image, ImageDraw

RGB = tuple[int, int, int]
SUPERSAMPLE = 3


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


def shade(colour: RGB, factor: float) -> RGB:
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
    colour, dark = attrs.hair, shade(attrs.hair, 0.75)
    if attrs.hair_style == "curly":  # a tall, wide mop of curls: the silhouette tells it from short hair
        if front:
            blobs = [(-0.6, -0.8), (-0.2, -0.92), (0.2, -0.92), (0.6, -0.8)]
        else:
            pen.ellipse(0, -0.55, 1.45, 0.95, depth=0.3, fill=dark)
            blobs = [
                (-1.2, -0.2),
                (1.2, -0.2),
                (-1.15, -0.75),
                (1.15, -0.75),
                (-0.7, -1.2),
                (0.7, -1.2),
                (0, -1.38),
            ]
        for i, (u, v) in enumerate(blobs):
            pen.ellipse(u, v, 0.42, 0.28, depth=0.3, fill=dark if i % 2 else colour)
    elif attrs.hair_style == "long":
        if not front:
            pen.draw.rectangle((*pen.xy(-1.2, -0.6, 0.2), *pen.xy(1.2, 1.4, 0.2)), fill=colour)
        pen.ellipse(0, -0.72 if front else -0.55, 1.08, 0.4 if front else 0.62, depth=0.2, fill=colour)
    elif attrs.hair_style == "short":
        pen.ellipse(0, -0.7 if front else -0.5, 1.02, 0.35 if front else 0.6, depth=0.2, fill=colour)


def _draw_eyes(pen: _Pen, attrs: FaceAttributes) -> None:
    socket = shade(attrs.skin, 0.7)
    for side in (-1, 1):
        u = side * 0.42
        pen.ellipse(u, -0.15, 0.26, 0.14, fill=socket)
        pen.ellipse(u, -0.12, 0.15, 0.06, fill=(185, 176, 166))
        pen.ellipse(u, -0.12, 0.08, 0.065, depth=1.15, fill=shade(attrs.eyes, 0.8))
        pen.ellipse(u, -0.12, 0.04, 0.035, depth=1.2, fill=(15, 12, 12))
        pen.line([(u - 0.16, -0.15), (u, -0.185), (u + 0.16, -0.15)], 0.04, fill=(40, 25, 20))
        pen.line([(u - 0.24, -0.33), (u, -0.37), (u + 0.24, -0.32)], 0.09, fill=shade(attrs.hair, 0.5))
        if attrs.glasses is not None:
            pen.ellipse(u, -0.12, 0.3, 0.16, outline=attrs.glasses, width=max(1, round(0.09 * pen.hw)))
    if attrs.glasses is not None:
        pen.line([(-0.09, -0.14), (0.09, -0.14)], 0.1, fill=attrs.glasses)
        pen.line([(-0.68, -0.14), (-0.98, -0.18)], 0.05, depth=0.5, fill=attrs.glasses)
        pen.line([(0.68, -0.14), (0.98, -0.18)], 0.05, depth=0.5, fill=attrs.glasses)


def _draw_lower_face(pen: _Pen, attrs: FaceAttributes) -> None:
    shadow = shade(attrs.skin, 0.7)
    pen.line([(0.02, -0.05), (0.1, 0.25), (0.0, 0.3)], 0.05, depth=1.4, fill=shadow)
    for side in (-1, 1):
        pen.ellipse(side * 0.08, 0.3, 0.05, 0.025, depth=1.3, fill=shade(attrs.skin, 0.45))
    beard = shade(attrs.hair, 1.4)
    if attrs.beard == "full":
        pen.draw.chord((*pen.xy(-0.95, -0.1, 0.5), *pen.xy(0.95, 1.1, 0.5)), 0, 180, fill=beard)
        pen.ellipse(0, 0.44, 0.34, 0.08, fill=beard)
    elif attrs.beard == "goatee":
        pen.ellipse(0, 0.82, 0.3, 0.2, fill=beard)
    pen.ellipse(0, 0.57, 0.26, 0.075, fill=attrs.lips)
    pen.line([(-0.25, 0.57), (0.25, 0.57)], 0.025, fill=shade(attrs.lips, 0.5))


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
        pen.ellipse(s * 1.0, -0.05, 0.14, 0.2, depth=0.1 - 0.5 * s * yaw, fill=shade(attrs.skin, 0.85))
    pen.ellipse(0, 0, 1.0, 1.0, depth=0.15, fill=shade(attrs.skin, 0.88))
    pen.ellipse(0, -0.04, 0.9, 0.92, depth=0.2, fill=attrs.skin)
    _draw_eyes(pen, attrs)
    _draw_lower_face(pen, attrs)
    _draw_hair(pen, attrs, front=True)
    return image.resize((2 * size, 2 * size), Image.Resampling.LANCZOS)
