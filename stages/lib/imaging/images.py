"""Image helpers shared by the stages: safe loading, grids, saving."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image, ImageDraw, ImageOps

if TYPE_CHECKING:
    import torch

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"}
VIEW_CELL = 256  # grids meant to be looked at (validation, samples) get cells at least this wide


def view_cell(images: Sequence[Image.Image]) -> int:
    """The cell width of a grid people look at: the images' own width, enlarged to at least ``VIEW_CELL``."""
    return max(VIEW_CELL, *(im.width for im in images))


def to_eight_bit(image: Image.Image) -> Image.Image:
    """A one-channel high-bit-depth image (16-bit ``I;16*``, 32-bit ``I``, float ``F``) as 8-bit ``L``, scaled by
    its bit depth instead of clipped: 16-bit data (also when Pillow holds it as ``I``) maps 0-65535 to 0-255,
    float data maps 0-1 to 0-255 (0-255 when its values reach past 1). Other modes are returned unchanged."""
    if not (image.mode.startswith("I") or image.mode == "F"):
        return image
    import numpy as np

    values = np.asarray(image).astype(np.float64)
    top = float(values.max()) if values.size else 0.0
    if image.mode.startswith("I;16") or (image.mode == "I" and top > 255):
        scale = 255 / 65535
    elif image.mode == "F" and top <= 1.0:
        scale = 255.0
    else:
        scale = 1.0
    return Image.fromarray(np.clip(np.rint(values * scale), 0, 255).astype(np.uint8), "L")


def to_rgb(image: Image.Image) -> Image.Image:
    """Apply EXIF orientation and convert any mode (RGBA, L, CMYK, P, I;16, I, F...) to 8-bit RGB on white."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return to_eight_bit(image).convert("RGB")


def to_pixels(images: Sequence[Image.Image], size: int | tuple[int, int] | None = None) -> torch.Tensor:
    """RGB images as one (N, 3, H, W) float tensor in [-1, 1] (what the VAE takes), resized (bicubic) to ``size``
    (side or (width, height)) when given."""
    import numpy as np
    import torch

    wanted = (size, size) if isinstance(size, int) else size
    arrays = [
        np.asarray(
            im.convert("RGB")
            if wanted is None or im.size == wanted
            else im.convert("RGB").resize(wanted, Image.Resampling.BICUBIC),
            np.float32,
        )
        for im in images
    ]
    return torch.from_numpy(np.stack(arrays) / 127.5 - 1.0).permute(0, 3, 1, 2)


def list_images(folder: Path) -> list[Path]:
    """Image files of a folder by suffix, sorted by name."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def make_grid(
    images: Sequence[Image.Image],
    columns: int | None = None,
    labels: Sequence[str] | None = None,
    cell: int | None = None,
) -> Image.Image:
    """Tile images into a grid (resized to a common square cell), optionally with a caption per cell."""
    if not images:
        raise ValueError("make_grid needs at least one image")
    columns = columns or math.ceil(math.sqrt(len(images)))
    columns = max(1, min(columns, len(images)))
    rows = math.ceil(len(images) / columns)
    cell = cell or max(im.width for im in images)
    label_h = 12 if labels else 0
    grid = Image.new("RGB", (columns * cell, rows * (cell + label_h)), "white")
    draw = ImageDraw.Draw(grid)
    for i, im in enumerate(images):
        x, y = (i % columns) * cell, (i // columns) * (cell + label_h)
        grid.paste(im.convert("RGB").resize((cell, cell), Image.Resampling.BICUBIC), (x, y + label_h))
        if labels:
            draw.text((x + 2, y), str(labels[i])[: max(4, cell // 6)], fill="black")
    return grid


def save_image(image: Image.Image, path: str | Path) -> Path:
    """Save an image, creating parent folders; the format follows the suffix."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path
