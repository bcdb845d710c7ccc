"""Geometric transforms of conditioning maps and of (map, photo) pairs: mirror, zoom out, shift.

One transform is an affine map of pixel coordinates: mirrored left-right about the centre (optional), scaled by
``scale`` (<= 1) about the centre, then shifted by ``shift_x`` x width and ``shift_y`` x height (positive: right,
down). A photo is resampled (bilinear) with its border pixels extended into the space it leaves; a map's edge
pixels are moved to their new places (nearest pixel), so a 1-pixel canny edge stays a connected 1-pixel edge and
the space the map leaves has no edges. A pair is moved by one transform, so its map stays the photo's map.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch
from PIL import Image

Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class Transform:
    """One geometric transform; the default leaves an image unchanged."""

    mirror: bool = False
    scale: float = 1.0
    shift_x: float = 0.0
    shift_y: float = 0.0

    @property
    def is_identity(self) -> bool:
        return not self.mirror and self.scale == 1.0 and self.shift_x == 0.0 and self.shift_y == 0.0

    def matrix(self, height: int, width: int) -> np.ndarray:
        """The 2 x 3 affine matrix from source to destination pixel coordinates (x, y)."""
        cx, cy = (width - 1) / 2, (height - 1) / 2
        sx = -self.scale if self.mirror else self.scale
        return np.array(
            [
                [sx, 0.0, cx - sx * cx + self.shift_x * width],
                [0.0, self.scale, cy - self.scale * cy + self.shift_y * height],
            ]
        )


def transform_photo(image: np.ndarray, t: Transform) -> np.ndarray:
    """An (H, W[, C]) image moved by ``t`` (bilinear), its border pixels extended into the uncovered space."""
    if t.is_identity:
        return image
    h, w = image.shape[:2]
    return cv2.warpAffine(
        image, t.matrix(h, w), (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE
    )


def transform_map(edges: np.ndarray, t: Transform) -> np.ndarray:
    """An (H, W[, C]) conditioning map (edges non-zero) with each edge pixel moved by ``t`` to its nearest pixel;
    edges moved outside the image are dropped. Same shape and dtype."""
    if t.is_identity:
        return edges
    h, w = edges.shape[:2]
    ys, xs = np.nonzero(edges.reshape(h, w, -1).max(axis=2))
    moved = t.matrix(h, w) @ np.stack([xs, ys, np.ones_like(xs)]).astype(np.float64)
    nx, ny = np.rint(moved).astype(np.int64)
    keep = (nx >= 0) & (nx < w) & (ny >= 0) & (ny < h)
    out = np.zeros_like(edges)
    out[ny[keep], nx[keep]] = edges[ys[keep], xs[keep]]
    return out


def transform_map_image(image: Image.Image, t: Transform) -> Image.Image:
    """:func:`transform_map` of a PIL conditioning map."""
    return image if t.is_identity else Image.fromarray(transform_map(np.asarray(image), t))


def transform_box(box: Box | None, t: Transform, height: int, width: int) -> Box | None:
    """A (left, top, right, bottom) box moved by ``t``, clipped to the image; None if it leaves the image."""
    if box is None or t.is_identity:
        return box
    left, top, right, bottom = box
    corners = t.matrix(height, width) @ np.array([[left, right], [top, bottom], [1, 1]], dtype=np.float64)
    xs, ys = np.sort(corners[0]), np.sort(corners[1])
    new = (max(0, round(xs[0])), max(0, round(ys[0])), min(width, round(xs[1])), min(height, round(ys[1])))
    return new if new[0] < new[2] and new[1] < new[3] else None


def random_transform(
    generator: torch.Generator, mirror: bool, min_scale: float, max_shift: float
) -> Transform:
    """A transform drawn from ``generator``: mirrored with probability 1/2 (if ``mirror``), scale uniform in
    [``min_scale``, 1], each shift uniform in [-``max_shift``, ``max_shift``]."""
    u = torch.rand(4, generator=generator, dtype=torch.float64).tolist()
    return Transform(
        mirror=mirror and u[0] < 0.5,
        scale=min_scale + (1.0 - min_scale) * u[1],
        shift_x=max_shift * (2 * u[2] - 1),
        shift_y=max_shift * (2 * u[3] - 1),
    )


def transform_pairs(
    pixels: torch.Tensor, maps: torch.Tensor, transforms: list[Transform]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Photos (N, 3, H, W) in [-1, 1] and their maps (N, C, H, W), row i moved by ``transforms[i]``."""
    if not len(transforms) == pixels.shape[0] == maps.shape[0]:
        raise ValueError(
            f"{len(transforms)} transforms for {pixels.shape[0]} photos and {maps.shape[0]} maps"
        )
    photos = pixels.permute(0, 2, 3, 1).cpu().numpy()
    conds = maps.permute(0, 2, 3, 1).cpu().numpy()
    out_photos = np.stack([transform_photo(p, t) for p, t in zip(photos, transforms, strict=True)])
    out_maps = np.stack([transform_map(m, t) for m, t in zip(conds, transforms, strict=True)])
    return (
        torch.from_numpy(out_photos.reshape(photos.shape)).permute(0, 3, 1, 2).to(pixels.dtype).contiguous(),
        torch.from_numpy(out_maps.reshape(conds.shape)).permute(0, 3, 1, 2).to(maps.dtype).contiguous(),
    )
