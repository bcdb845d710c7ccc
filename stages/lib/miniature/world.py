"""The miniature world of the embedded default: captioned face-centred images of stylised people.

Every image is a person (an identity: skin tone, hair colour, hair style, beard, glasses) in a scene (plain,
kitchen, forest, night city) drawn in a style (photo, anime, classicist painting), with a caption in the seed's
vocabulary ("a photo of man face in a forest", "anime style portrait of man face with glasses", ...). The world never
shows the sample subject's identity (``SUBJECT_IDENTITY``); everything else appears. Image ``i`` of a world depends
only on ``(seed, i)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageOps

from stages.lib.miniature.face_render import RGB, FaceAttributes, draw_face, shade

SKIN: dict[str, RGB] = {
    "light": (236, 196, 164),
    "tan": (198, 140, 100),
    "brown": (141, 92, 62),
    "dark": (86, 55, 38),
}
HAIR_COLOUR: dict[str, RGB] = {
    "black": (28, 24, 24),
    "blond": (230, 196, 110),
    "ginger": (170, 68, 28),
    "white": (214, 214, 210),
}
HAIR_STYLE = ("curly", "short", "long", "bald")
BEARD = ("beard", "shaven")
GLASSES = ("glasses", "no glasses")
SCENES = ("plain", "kitchen", "forest", "night city")
STYLES = ("photo", "anime", "classicist")
# Attribute name -> its classes; the identity attributes first. The attribute reader has one head per entry.
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "skin": tuple(SKIN),
    "hair_colour": tuple(HAIR_COLOUR),
    "hair_style": HAIR_STYLE,
    "beard": BEARD,
    "glasses": GLASSES,
    "scene": SCENES,
    "style": STYLES,
}
IDENTITY_ATTRIBUTES = ("skin", "hair_colour", "hair_style", "beard", "glasses")
STYLE_PREFIX = {
    "photo": "a photo of",
    "anime": "anime style portrait of",
    "classicist": "classicist art painting of",
}
SCENE_SUFFIX = {
    "plain": "",
    "kitchen": " in a kitchen",
    "forest": " in a forest",
    "night city": " in a night city",
}


@dataclass(frozen=True)
class Identity:
    """One person of the world, by attribute class names."""

    skin: str
    hair_colour: str
    hair_style: str
    beard: str
    glasses: str

    def face(self) -> FaceAttributes:
        """The renderer's attributes of this identity."""
        return FaceAttributes(
            skin=SKIN[self.skin],
            hair=HAIR_COLOUR[self.hair_colour],
            hair_style=self.hair_style,
            eyes=(70, 90, 120),
            glasses=(16, 16, 20) if self.glasses == "glasses" else None,
            beard="full" if self.beard == "beard" else "none",
        )

    def phrase(self, rng: np.random.Generator) -> str:
        """A caption fragment naming a random subset of this identity's attributes ("" for none)."""
        parts = []
        if rng.random() < 0.5:
            parts.append(
                "a bald head" if self.hair_style == "bald" else f"{self.hair_colour} {self.hair_style} hair"
            )
        if rng.random() < 0.5 and self.beard == "beard":
            parts.append("a beard")
        if rng.random() < 0.5 and self.glasses == "glasses":
            parts.append("glasses")
        if rng.random() < 0.3:
            parts.insert(0, f"{self.skin} skin")
        return " with " + " and ".join(parts) if parts else ""


SUBJECT_IDENTITY = Identity("tan", "ginger", "curly", "beard", "glasses")  # = face_render.SUBJECT's look


@dataclass(frozen=True)
class WorldImage:
    """What one world image shows, and its caption."""

    identity: Identity
    scene: str
    style: str
    caption: str

    def labels(self) -> dict[str, int]:
        """Class index per attribute (the attribute reader's targets)."""
        values = {**self.identity.__dict__, "scene": self.scene, "style": self.style}
        return {name: ATTRIBUTES[name].index(values[name]) for name in ATTRIBUTES}


def caption(identity: Identity, scene: str, style: str, rng: np.random.Generator, token: str = "") -> str:
    """The seed's vocabulary: "<style prefix> [token ]man face[ with <attributes>]<scene suffix>"."""
    subject = f"{token} man face" if token else "man face"
    return f"{STYLE_PREFIX[style]} {subject}{identity.phrase(rng)}{SCENE_SUFFIX[scene]}"


def random_identity(rng: np.random.Generator) -> Identity:
    """Any identity of the world except the sample subject's."""
    while True:
        identity = Identity(*(str(rng.choice(ATTRIBUTES[name])) for name in IDENTITY_ATTRIBUTES))
        if identity != SUBJECT_IDENTITY:
            return identity


def describe(seed: int, index: int, caption_dropout: float = 0.1) -> WorldImage:
    """What image ``index`` of the world ``seed`` shows; a ``caption_dropout`` share has an empty caption."""
    rng = np.random.default_rng([seed, index, 1])
    identity = random_identity(rng)
    scene, style = str(rng.choice(SCENES)), str(rng.choice(STYLES))
    text = "" if rng.random() < caption_dropout else caption(identity, scene, style, rng)
    return WorldImage(identity, scene, style, text)


# -- scenes ----------------------------------------------------------------------------------------------------
def _jitter(rng: np.random.Generator, colour: RGB, amount: int = 18) -> RGB:
    return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in colour)  # type: ignore[return-value]


def _gradient(top: RGB, bottom: RGB, width: int, height: int) -> Image.Image:
    t = np.linspace(0, 1, height)[:, None, None]
    rows = np.array(top) * (1 - t) + np.array(bottom) * t
    return Image.fromarray(np.broadcast_to(rows, (height, width, 3)).astype(np.uint8))


def _plain(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    """A light wall or backdrop with a few soft shapes."""
    image = _gradient(_jitter(rng, (200, 200, 196), 40), _jitter(rng, (170, 172, 176), 40), w, h)
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(1, 4))):
        x0, y0 = rng.integers(0, w), rng.integers(0, h)
        x1, y1 = x0 + rng.integers(w // 8, w // 2), y0 + rng.integers(h // 8, h // 2)
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape((x0, y0, x1, y1), fill=_jitter(rng, (185, 185, 185), 45))
    return image.filter(ImageFilter.GaussianBlur(max(1, w // 60)))


def _kitchen(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    """Cream tiles above a wooden counter, a cabinet and a window."""
    image = Image.new("RGB", (w, h), _jitter(rng, (232, 222, 190), 10))
    draw = ImageDraw.Draw(image)
    tile = max(3, w // int(rng.integers(3, 5)))
    grout = (196, 186, 160)
    for x in range(0, w, tile):
        draw.line((x, 0, x, h), fill=grout, width=max(1, w // 96))
    for y in range(0, h, tile):
        draw.line((0, y, w, y), fill=grout, width=max(1, w // 96))
    x0 = int(rng.uniform(0.0, 0.6) * w)
    draw.rectangle((x0, 0, x0 + w // 3, int(0.22 * h)), fill=_jitter(rng, (150, 100, 60), 12))
    counter = int(rng.uniform(0.66, 0.76) * h)
    draw.rectangle((0, counter, w, h), fill=_jitter(rng, (128, 82, 44), 12))
    draw.rectangle((0, counter, w, counter + max(1, h // 40)), fill=(186, 150, 110))
    return image


def _forest(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    """Green depth, dark trunks and leaves."""
    image = _gradient(_jitter(rng, (120, 170, 90), 15), _jitter(rng, (30, 70, 30), 10), w, h)
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(2, 4))):
        x, tw = rng.uniform(0, w), rng.uniform(0.08, 0.14) * w
        draw.rectangle((x, 0, x + tw, h), fill=_jitter(rng, (70, 48, 28), 10))
    for _ in range(int(rng.integers(3, 6))):
        x, y, r = rng.uniform(0, w), rng.uniform(0, 0.4 * h), rng.uniform(0.12, 0.2) * w
        draw.ellipse((x - r, y - r, x + r, y + r), fill=_jitter(rng, (50, 110, 45), 20))
    return image


def _night_city(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    """A dark blue sky, black towers and lit windows."""
    image = _gradient(_jitter(rng, (20, 26, 62), 8), (6, 6, 14), w, h)
    draw = ImageDraw.Draw(image)
    x = -rng.uniform(0, 0.1) * w
    while x < w:
        bw, top = rng.uniform(0.12, 0.3) * w, rng.uniform(0.1, 0.5) * h
        draw.rectangle((x, top, x + bw, h), fill=_jitter(rng, (24, 24, 34), 6))
        step = max(2.0, w / 10)
        for wy in np.arange(top + step / 2, h, step):
            for wx in np.arange(x + step / 2, x + bw - step / 2, step):
                if rng.random() < 0.45:
                    draw.rectangle(
                        (wx, wy, wx + step / 2, wy + step / 2), fill=_jitter(rng, (240, 206, 90), 15)
                    )
        x += bw + rng.uniform(0, 0.05) * w
    return image


SCENE_PAINTERS = {"plain": _plain, "kitchen": _kitchen, "forest": _forest, "night city": _night_city}


def paint_scene(scene: str, rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """The background of ``scene`` at ``width`` x ``height``."""
    return SCENE_PAINTERS[scene](rng, width, height)


# -- people and styles -----------------------------------------------------------------------------------------
def place_person(
    image: Image.Image, face: FaceAttributes, rng: np.random.Generator, cx: float, cy: float, size: int
) -> Image.Image:
    """Paste shoulders, neck and the head of ``face`` (``size`` px tall, centred at cx, cy) onto ``image``."""
    draw = ImageDraw.Draw(image)
    shirt = tuple(int(c) for c in rng.integers(30, 230, 3))
    draw.ellipse((cx - 1.1 * size, cy + 0.75 * size, cx + 1.1 * size, cy + 2.6 * size), fill=shirt)
    draw.rectangle(
        (cx - 0.18 * size, cy + 0.3 * size, cx + 0.18 * size, cy + 0.9 * size), fill=shade(face.skin, 0.8)
    )
    head = draw_face(face, size, yaw=float(rng.uniform(-0.35, 0.35)))
    head = head.rotate(float(rng.uniform(-6, 6)), Image.Resampling.BICUBIC)
    image.paste(head, (round(cx - size), round(cy - size)), head)
    return image


def _photo(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    light = rng.uniform(0.88, 1.12)
    noise = rng.normal(0, 4, (image.height, image.width, 3))
    return Image.fromarray(np.clip(np.asarray(image, np.float32) * light + noise, 0, 255).astype(np.uint8))


def _anime(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Flat, saturated colours with dark outlines."""
    flat = ImageOps.posterize(ImageEnhance.Color(image).enhance(1.8), 3)
    edges = ImageOps.grayscale(image).filter(ImageFilter.FIND_EDGES).point(lambda v: 255 if v > 40 else 0)
    return Image.composite(Image.new("RGB", image.size, (20, 16, 30)), flat, edges)


def _classicist(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Warm sepia oil tones, a dark vignette and a gilded frame."""
    w, h = image.size
    sepia = ImageOps.colorize(ImageOps.grayscale(image), (52, 30, 14), (240, 214, 160))
    painted = Image.blend(image, sepia, 0.45).filter(ImageFilter.SMOOTH_MORE)
    yy, xx = np.mgrid[0:h, 0:w]
    r = np.hypot((xx - w / 2) / (w / 2), (yy - h / 2) / (h / 2))
    vignette = np.clip(1.15 - 0.45 * r**2, 0.35, 1.0)[..., None]
    painted = Image.fromarray((np.asarray(painted, np.float32) * vignette).astype(np.uint8))
    draw = ImageDraw.Draw(painted)
    border = max(2, w // 14)
    draw.rectangle((0, 0, w - 1, h - 1), outline=(188, 146, 62), width=border)
    draw.rectangle(
        (border, border, w - 1 - border, h - 1 - border), outline=(70, 44, 16), width=max(1, border // 3)
    )
    return painted


STYLE_FILTERS = {"photo": _photo, "anime": _anime, "classicist": _classicist}


def apply_style(image: Image.Image, style: str, rng: np.random.Generator) -> Image.Image:
    """Render ``image`` in ``style`` (photo | anime | classicist)."""
    return STYLE_FILTERS[style](image, rng)


def render(item: WorldImage, size: int, rng: np.random.Generator) -> Image.Image:
    """A face-centred square crop (like prep's output) of ``item`` at ``size`` px."""
    canvas = 2 * size  # draw at twice the size, then downsample: smooth edges at 32-64 px
    image = paint_scene(item.scene, rng, canvas, canvas)
    face = int(canvas * rng.uniform(0.46, 0.54))
    cx = canvas * (0.5 + rng.uniform(-0.03, 0.03))
    cy = canvas * (0.47 + rng.uniform(-0.03, 0.03))
    image = place_person(image, item.identity.face(), rng, cx, cy, face)
    image = apply_style(image, item.style, rng)
    return image.resize((size, size), Image.Resampling.LANCZOS)


def render_world(
    seed: int, indices: range, size: int, caption_dropout: float = 0.1
) -> list[tuple[Image.Image, WorldImage]]:
    """Images ``indices`` of the world ``seed`` with what they show."""
    out = []
    for i in indices:
        item = describe(seed, i, caption_dropout)
        out.append((render(item, size, np.random.default_rng([seed, i, 2])), item))
    return out
