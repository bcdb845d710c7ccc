"""Offline face detection (OpenCV's bundled Haar cascade) and birme-style focal-point square crops.

``focal_crop`` centres a square crop on the largest face; without a face it falls back to a simple numpy
saliency centroid (colour contrast + gradient magnitude) and finally to the image centre. ``detect_faces`` and
``face_detection_rate`` are reused by later stages to measure how often generated images show a face.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache

import cv2
import numpy as np
from PIL import Image, ImageFilter

FACE_CASCADE = "haarcascade_frontalface_default.xml"
DETECT_SIDE = 512  # the long side is scaled to this before detection (speed on photos, recall on thumbnails)
SALIENCY_SIDE = 128  # saliency is computed on a thumbnail of this long side
MIN_SALIENCY_CONTRAST = 0.02  # below this spread (0..1 scale) the image counts as flat -> centre crop

Method = str  # "face" | "saliency" | "center"


@dataclass(frozen=True)
class Box:
    """A pixel rectangle ``[left, right) x [top, bottom)``."""

    left: int
    top: int
    right: int
    bottom: int

    @property
    def width(self) -> int:
        return self.right - self.left

    @property
    def height(self) -> int:
        return self.bottom - self.top

    @property
    def area(self) -> int:
        return self.width * self.height

    @property
    def center(self) -> tuple[float, float]:
        return (self.left + self.right) / 2, (self.top + self.bottom) / 2

    def as_list(self) -> list[int]:
        """``[left, top, right, bottom]`` for JSON."""
        return [self.left, self.top, self.right, self.bottom]

    def contains(self, other: Box) -> bool:
        """True when ``other`` lies entirely inside this box."""
        return (
            self.left <= other.left
            and self.top <= other.top
            and other.right <= self.right
            and other.bottom <= self.bottom
        )

    def in_crop(self, crop: Box, size: int) -> Box:
        """This box in the pixel coordinates of ``crop`` resized to ``size`` x ``size``, clipped to it."""
        sx, sy = size / crop.width, size / crop.height

        def clip(v: float) -> int:
            return int(round(min(max(v, 0.0), size)))

        return Box(
            clip((self.left - crop.left) * sx),
            clip((self.top - crop.top) * sy),
            clip((self.right - crop.left) * sx),
            clip((self.bottom - crop.top) * sy),
        )


@dataclass(frozen=True)
class FocalCrop:
    """A square crop box inside the image, how its centre was chosen and the face it is centred on."""

    box: Box
    method: Method
    face: Box | None = None
    detector: str = ""  # which detector found ``face``: "dlib" | "haar" ("" without a face)


@lru_cache(maxsize=4)
def face_cascade(name: str = FACE_CASCADE) -> cv2.CascadeClassifier:
    """The bundled Haar cascade ``name``, loaded once (needs opencv-python-headless < 5)."""
    data_dir = getattr(getattr(cv2, "data", None), "haarcascades", None)
    if data_dir is None or not hasattr(cv2, "CascadeClassifier"):
        raise RuntimeError(
            "this OpenCV build has no Haar cascades (opencv-python-headless 5.x dropped them): "
            "install 'opencv-python-headless<5'"
        )
    classifier = cv2.CascadeClassifier(data_dir + name)
    if classifier.empty():
        raise RuntimeError(f"cannot load the Haar cascade {data_dir + name}")
    return classifier


def _gray(image: Image.Image | np.ndarray) -> np.ndarray:
    """An 8-bit grayscale array of a PIL image or an RGB/gray uint8 array."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("L"))
    array = np.asarray(image)
    return cv2.cvtColor(array, cv2.COLOR_RGB2GRAY) if array.ndim == 3 else array


def detect_faces(
    image: Image.Image | np.ndarray, min_face_fraction: float = 0.0, min_neighbors: int = 5
) -> list[Box]:
    """Frontal faces in ``image`` (PIL or RGB array), largest first, in the image's pixel coordinates.

    Detections smaller than ``min_face_fraction`` of the image's short side are ignored.
    """
    gray = _gray(image)
    height, width = gray.shape[:2]
    scale = DETECT_SIDE / max(height, width)
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    small = cv2.resize(
        gray, (max(1, round(width * scale)), max(1, round(height * scale))), interpolation=interpolation
    )
    min_px = max(24, int(min_face_fraction * min(small.shape[:2])))
    found = face_cascade().detectMultiScale(
        small, scaleFactor=1.1, minNeighbors=min_neighbors, minSize=(min_px, min_px)
    )
    boxes = [
        Box(
            max(0, round(x / scale)),
            max(0, round(y / scale)),
            min(width, round((x + w) / scale)),
            min(height, round((y + h) / scale)),
        )
        for x, y, w, h in np.asarray(found).reshape(-1, 4)
    ]
    return sorted(boxes, key=lambda b: b.area, reverse=True)


def face_detection_rate(images: Iterable[Image.Image], min_face_fraction: float = 0.0) -> float:
    """Fraction of ``images`` in which at least one face is detected (0.0 for no images)."""
    hits = [bool(detect_faces(im, min_face_fraction)) for im in images]
    return sum(hits) / len(hits) if hits else 0.0


def saliency_map(image: Image.Image, side: int = SALIENCY_SIDE) -> np.ndarray:
    """A 0..1 saliency map of a thumbnail of ``image``: colour distance from the mean plus edge strength."""
    thumb = image.convert("RGB")
    thumb.thumbnail((side, side), Image.Resampling.BILINEAR)
    rgb = np.asarray(thumb.filter(ImageFilter.GaussianBlur(1)), dtype=np.float32) / 255.0
    contrast = np.linalg.norm(rgb - rgb.reshape(-1, 3).mean(axis=0), axis=2)
    gy, gx = np.gradient(rgb.mean(axis=2))
    edges = np.hypot(gx, gy)
    edges = cv2.GaussianBlur(edges, (0, 0), sigmaX=max(1.0, side / 32))
    return contrast / np.sqrt(3) + edges


def salient_point(image: Image.Image) -> tuple[float, float] | None:
    """Saliency-weighted centroid ``(x, y)`` in image pixels, or None when the image is flat."""
    sal = saliency_map(image)
    if float(sal.max() - sal.min()) < MIN_SALIENCY_CONTRAST:
        return None
    weights = np.clip(sal - np.percentile(sal, 75), 0, None) ** 2
    if float(weights.sum()) <= 0:
        return None
    ys, xs = np.indices(sal.shape)
    total = float(weights.sum())
    cx = (float((xs * weights).sum()) / total + 0.5) * image.width / sal.shape[1]
    cy = (float((ys * weights).sum()) / total + 0.5) * image.height / sal.shape[0]
    return cx, cy


def square_box(center: tuple[float, float], side: int, width: int, height: int) -> Box:
    """A ``side`` x ``side`` box centred on ``center`` as nearly as the image bounds allow."""
    side = max(1, min(int(side), width, height))
    left = min(max(int(round(center[0] - side / 2)), 0), width - side)
    top = min(max(int(round(center[1] - side / 2)), 0), height - side)
    return Box(left, top, left + side, top + side)


def face_crop(
    face: Box, size: tuple[int, int], face_padding: float, min_side: int = 0, detector: str = "haar"
) -> FocalCrop:
    """The square crop centred on ``face`` in an image of ``size``: side = face size * ``face_padding`` (at
    least ``min_side``), clamped to the short side."""
    side = max(round(max(face.width, face.height) * face_padding), min_side)
    return FocalCrop(square_box(face.center, side, *size), "face", face, detector)


def focal_crop(
    image: Image.Image, face_padding: float = 1.8, min_face_fraction: float = 0.05, min_side: int = 0
) -> FocalCrop:
    """The square crop of ``image`` centred on its focal point.

    Face found by the Haar cascade: centred on the largest face (``face_crop``). Otherwise the largest square
    around the saliency centroid, else the centre. (prep tries dlib's detector first: stages/lib/imaging/face_detection.py.)
    """
    width, height = image.size
    short = min(width, height)
    faces = detect_faces(image, min_face_fraction)
    if faces:
        return face_crop(faces[0], image.size, face_padding, min_side)
    point = salient_point(image)
    if point is not None:
        return FocalCrop(square_box(point, short, width, height), "saliency")
    return FocalCrop(square_box((width / 2, height / 2), short, width, height), "center")
