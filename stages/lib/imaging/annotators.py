"""Offline annotators: images -> ControlNet conditioning maps, with no downloaded weights.

``canny`` is OpenCV's Canny edge detector on the RGB image (as in diffusers' ControlNet examples), returned as a
3-channel black/white PIL image: what a pretrained SD1.5 canny ControlNet expects and what the embedded default's
ControlNet is trained on.
"""

from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np
import torch
from PIL import Image

from stages.lib.errors import StageError
from stages.lib.imaging.images import to_rgb


class AnnotatorError(StageError):
    """An annotator name or setting is invalid; the message names the key and the fix."""


def canny_edges(image: Image.Image | np.ndarray, low: int, high: int) -> np.ndarray:
    """Boolean (H, W) edge map of an RGB image (PIL or uint8 array)."""
    if not 0 <= low <= high:
        raise AnnotatorError(
            f"controlnet.low_threshold={low} / high_threshold={high}: need 0 <= low_threshold <= high_threshold"
        )
    array = np.asarray(to_rgb(image) if isinstance(image, Image.Image) else image, dtype=np.uint8)
    return cv2.Canny(np.ascontiguousarray(array), low, high) > 0


def canny(image: Image.Image, low: int = 100, high: int = 200) -> Image.Image:
    """The canny conditioning map: white (255) edges on black, 3 channels, the size of ``image``."""
    edges = canny_edges(image, low, high).astype(np.uint8) * 255
    return Image.fromarray(np.repeat(edges[:, :, None], 3, axis=2))


ANNOTATORS: dict[str, Callable[[Image.Image, int, int], Image.Image]] = {"canny": canny}


def get_annotator(name: str, low: int, high: int) -> Callable[[Image.Image], Image.Image]:
    """The annotator ``name`` with its thresholds bound; an unknown name is an error listing the known ones."""
    if name not in ANNOTATORS:
        raise AnnotatorError(f"controlnet.annotator='{name}' is unknown; use one of {', '.join(ANNOTATORS)}")
    fn = ANNOTATORS[name]
    return lambda image: fn(image, low, high)


def annotate_pixels(pixels: torch.Tensor, annotator: Callable[[Image.Image], Image.Image]) -> torch.Tensor:
    """Conditioning tensors in [0, 1] (N, 3, H, W) for training images in [-1, 1] (N, 3, H, W).

    [0, 1] without normalisation is what diffusers' ControlNet pipelines feed the ControlNet at inference.
    """
    arrays = ((pixels.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    maps = [np.asarray(annotator(Image.fromarray(a)), dtype=np.float32) / 255.0 for a in arrays]
    return torch.from_numpy(np.stack(maps)).permute(0, 3, 1, 2).contiguous()
