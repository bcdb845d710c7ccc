"""Identity: is it the same person? dlib face embeddings of generated images against the subject's photos.

The field's recipe (FastComposer; PhotoMaker and IP-Adapter-FaceID alike): detect the face, embed it, compare with
the reference photos' embeddings; an image with no face scores 0. Here each image's largest face is embedded by dlib
(stages/lib/imaging/face_detection.py) and compared with every prepared photo's face: its best cosine similarity and its
nearest dlib distance, and whether that distance is within dlib's same-person threshold (0.6). Prep uses the same
embeddings to tell the subject's face from the others in a photo with several people (``pick_subject``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from stages.lib.imaging import face_detection
from stages.lib.imaging.face_detection import SAME_PERSON, DlibFaces, Face

METRICS = {  # name -> what it measures, in report order; "class_" + name: the same on the class prompt's images
    "identity_similarity": "best cosine similarity of each image's dlib face embedding to a prepared photo's, "
    "averaged; an image without a detected face scores 0 (FastComposer's identity score); higher = the subject",
    "identity_match_rate": f"share of images whose face is within dlib's same-person distance {SAME_PERSON} of a "
    "prepared photo's face (no face: no match)",
    "identity_distance": "dlib embedding distance of each image's face to the nearest prepared photo's, averaged "
    f"over the images with a face; lower = closer, < {SAME_PERSON} = same person",
    "identity_no_face": "number of images in which dlib finds no face (they score 0 above)",
}
CLASS_PREFIX = "class_"  # the same metrics of the class prompt's images: the language-drift check
DRIFT = "on the class prompt's images (language drift: the closer to the subject, the more the class is the subject)"
DESCRIPTIONS = METRICS | {CLASS_PREFIX + k: f"{v.split(';')[0]}, {DRIFT}" for k, v in METRICS.items()}


@dataclass(frozen=True)
class Match:
    """One image against the references: None fields when no face was found."""

    distance: float | None
    similarity: float | None


def pick_subject(candidates: Sequence[Sequence[Face]], max_distance: float = SAME_PERSON) -> list[int | None]:
    """For each photo's faces (largest first, with embeddings), the index of the subject's face: the one that
    matches (within ``max_distance``) a face in the most other photos, ties to the larger; None without faces.

    A photo with one face keeps it; a group photo gives the person seen across the folder, not the largest face.
    """
    chosen: list[int | None] = []
    for i, faces in enumerate(candidates):
        if len(faces) <= 1:
            chosen.append(0 if faces else None)
            continue
        support = []
        for face in faces:
            count = 0
            if face.embedding is not None:
                for j, others in enumerate(candidates):
                    vectors = [o.embedding for o in others if o.embedding is not None]
                    if j != i and vectors:
                        count += bool(
                            face_detection.distances(face.embedding, np.stack(vectors)).min() < max_distance
                        )
            support.append(count)
        chosen.append(int(np.argmax(support)))  # argmax takes the first (largest) face among ties
    return chosen


def embed_largest(models: DlibFaces, image: Image.Image) -> np.ndarray | None:
    """The embedding of the largest face in ``image``, None when there is no face."""
    faces = models.detect(image, embed=True, max_faces=1)
    return faces[0].embedding if faces else None


def match(vector: np.ndarray | None, references: np.ndarray) -> Match:
    if vector is None:
        return Match(None, None)
    return Match(
        float(face_detection.distances(vector, references).min()),
        float(face_detection.cosines(vector, references).max()),
    )


def summarise(matches: Sequence[Match], prefix: str = "") -> dict[str, float]:
    """The identity metrics of a set of images (none for an empty set)."""
    if not matches:
        return {}
    found = [m for m in matches if m.distance is not None]
    metrics = {
        "identity_similarity": sum(m.similarity or 0.0 for m in matches) / len(matches),
        "identity_match_rate": sum(m.distance < SAME_PERSON for m in found) / len(matches),  # type: ignore[operator]
        "identity_no_face": float(len(matches) - len(found)),
    }
    if found:
        metrics["identity_distance"] = sum(m.distance for m in found) / len(found)  # type: ignore[misc]
    return {prefix + k: v for k, v in metrics.items()}


@dataclass
class IdentityScorer:
    """The prepared photos' face embeddings and the models that embed generated images against them."""

    models: DlibFaces
    references: np.ndarray  # (N, 128), one row per prepared photo with a face
    num_photos: int

    @classmethod
    def create(cls, photos: Sequence[Image.Image]) -> tuple[IdentityScorer | None, str | None]:
        """The scorer, or None and the reason the identity score cannot apply."""
        models = face_detection.load()
        if models is None:
            return None, f"{face_detection.unavailable_reason()}"
        vectors = [v for v in (embed_largest(models, im) for im in photos) if v is not None]
        if not vectors:
            return (
                None,
                f"dlib finds no face in any of the {len(photos)} prepared photos: nothing to compare with",
            )
        return cls(models, np.stack(vectors), len(photos)), None

    def matches(self, images: Sequence[Image.Image]) -> list[Match]:
        return [match(embed_largest(self.models, im), self.references) for im in images]

    def score(self, images: Sequence[Image.Image], prefix: str = "") -> dict[str, float]:
        """``identity_*`` metrics of ``images`` (keys prefixed with ``prefix``)."""
        return summarise(self.matches(images), prefix)
