"""dlib's face detector and face embedder, with the weights the ``face-recognition-models`` package ships.

``load()`` gives the models once per process, or None when they cannot be used here (``dlib`` or
``face-recognition-models`` not installed, a model file damaged); ``unavailable_reason()`` says why, so that prep
falls back to the Haar cascade and compare skips its identity score with that reason instead of failing. Only
dlib's HOG detector (built into dlib), the 5-point landmark model and the ResNet embedder are used (docs/faces.md:
licences, timings); nothing is downloaded at run time.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from stages.lib.imaging.faces import Box

DETECT_SIDE = 512  # the long side is scaled to this before detection (speed on photos, recall on thumbnails)
UPSAMPLE = 1  # dlib's pyramid upsampling: finds faces down to ~40 px at DETECT_SIDE
SAME_PERSON = 0.6  # dlib's same-person threshold on the embedding distance
# dlib's HOG boxes are tight (brows to chin); they are given in the Haar cascade's framing, so that prep.face_padding
# and the face-weighted loss keep their meaning: measured on 26 faces (astronaut, Grace Hopper, the sample subject),
# Haar's box is 1.22x as large and its centre 0.09 of the box height higher.
HAAR_SCALE, HAAR_SHIFT = 1.22, -0.09
MODELS_PACKAGE = "face_recognition_models"
# The two weight files used, with their SHA-256: a damaged or substituted file is refused, not loaded.
MODEL_FILES = {
    "shape_predictor_5_face_landmarks.dat": "c4b1e9804792707d3a405c2c16a80a20269e6675021f64a41d30fffafbc41888",
    "dlib_face_recognition_resnet_model_v1.dat": "55533b28a95800a551ba546ba62fe69625c7e95a7061c338adffead08719da30",
}
INSTALL = "pip install -c constraints.txt dlib-bin face-recognition-models"


@dataclass(frozen=True)
class Face:
    """One detection: its box in the image's pixels, dlib's confidence and (when asked for) its embedding."""

    box: Box
    score: float
    embedding: np.ndarray | None = None


def models_dir() -> Path | None:
    """The folder of face-recognition-models' weights, found without importing the package (its ``__init__``
    needs ``pkg_resources``, which current setuptools no longer ships)."""
    spec = importlib.util.find_spec(MODELS_PACKAGE)
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent / "models"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class DlibFaces:
    """dlib's HOG face detector, 5-point landmarks and ResNet face embedder (128-d, unit scale ~1)."""

    def __init__(self, dlib: Any, folder: Path) -> None:
        self._dlib = dlib
        self.detector = dlib.get_frontal_face_detector()
        self.predictor = dlib.shape_predictor(str(folder / "shape_predictor_5_face_landmarks.dat"))
        self.encoder = dlib.face_recognition_model_v1(
            str(folder / "dlib_face_recognition_resnet_model_v1.dat")
        )

    def detect(
        self,
        image: Image.Image | np.ndarray,
        min_face_fraction: float = 0.0,
        embed: bool = False,
        max_faces: int | None = None,
    ) -> list[Face]:
        """Faces in ``image`` (PIL or RGB array), largest first, in its pixels; detections smaller than
        ``min_face_fraction`` of the short side are dropped; with ``embed`` each of the ``max_faces`` largest
        carries its embedding."""
        rgb = image.convert("RGB") if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
        width, height = rgb.size
        scale = DETECT_SIDE / max(width, height)
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        pixels = np.ascontiguousarray(
            rgb.resize(size, Image.Resampling.BILINEAR if scale > 1 else Image.Resampling.BOX).convert("RGB")
        )
        rects, scores, _ = self.detector.run(pixels, UPSAMPLE, 0.0)
        found = []
        for rect, score in zip(rects, scores, strict=True):
            side = (rect.right() + 1 - rect.left() + rect.bottom() + 1 - rect.top()) / 2 * HAAR_SCALE / scale
            cx = (rect.left() + rect.right() + 1) / 2 / scale
            cy = (rect.top() + rect.bottom() + 1) / 2 / scale + HAAR_SHIFT * side / HAAR_SCALE
            box = Box(
                max(0, round(cx - side / 2)),
                max(0, round(cy - side / 2)),
                min(width, round(cx + side / 2)),
                min(height, round(cy + side / 2)),
            )
            if (
                box.width > 0
                and box.height > 0
                and min(box.width, box.height) >= min_face_fraction * min(width, height)
            ):
                found.append((box, float(score), rect))
        found.sort(key=lambda f: f[0].area, reverse=True)
        faces = []
        for i, (box, score, rect) in enumerate(found):
            vector = None
            if embed and (max_faces is None or i < max_faces):
                shape = self.predictor(pixels, rect)
                vector = np.asarray(self.encoder.compute_face_descriptor(pixels, shape), dtype=np.float64)
            faces.append(Face(box, score, vector))
        return faces


@lru_cache(maxsize=1)
def _load() -> tuple[DlibFaces | None, str | None]:
    try:
        dlib = importlib.import_module("dlib")
    except ImportError as err:
        return None, f"dlib is not installed ({err}): {INSTALL}"
    folder = models_dir()
    if folder is None:
        return None, f"face-recognition-models is not installed: {INSTALL}"
    for name, expected in MODEL_FILES.items():
        path = folder / name
        if not path.is_file():
            return None, f"{path} is missing: reinstall face-recognition-models ({INSTALL})"
        if _sha256(path) != expected:
            return None, f"{path} does not have the expected SHA-256 (damaged or replaced): reinstall it"
    try:
        return DlibFaces(dlib, folder), None
    except RuntimeError as err:  # dlib raises RuntimeError for unreadable model files
        return None, f"dlib cannot load the models in {folder} ({err}): reinstall face-recognition-models"


def load() -> DlibFaces | None:
    """The dlib models, loaded once per process; None when they cannot be used (see ``unavailable_reason``)."""
    return _load()[0]


def unavailable_reason() -> str | None:
    """Why dlib's face models cannot be used on this machine; None when they can."""
    return _load()[1]


def reset() -> None:
    """Forget the loaded models (tests that make the packages unavailable)."""
    _load.cache_clear()


def distances(vector: np.ndarray, references: np.ndarray) -> np.ndarray:
    """dlib's embedding distance (Euclidean) from ``vector`` to each row of ``references``."""
    return np.linalg.norm(references - vector[None, :], axis=1)


def cosines(vector: np.ndarray, references: np.ndarray) -> np.ndarray:
    """Cosine similarity of ``vector`` to each row of ``references``."""
    norms = np.linalg.norm(references, axis=1) * np.linalg.norm(vector)
    return (references @ vector) / np.where(norms > 0, norms, 1.0)
