"""Edge agreement between a control map and a generated image: precision, recall and F1 with a pixel tolerance.

An edge pixel of one map counts as matched when the other map has an edge within ``tolerance`` pixels (a disc),
as in the BSDS boundary benchmark, whose default tolerance is 0.75 % of the image diagonal.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

DEFAULT_TOLERANCE_FRACTION = 0.0075  # of the image diagonal (BSDS maxDist)


@dataclass(frozen=True)
class EdgeScore:
    precision: float  # share of the candidate's edge pixels near a reference edge
    recall: float  # share of the reference's edge pixels near a candidate edge
    f1: float


def tolerance_pixels(height: int, width: int, fraction: float = DEFAULT_TOLERANCE_FRACTION) -> int:
    """The pixel tolerance of an image size: ``fraction`` of the diagonal, at least 1 pixel."""
    return max(1, round(fraction * math.hypot(height, width)))


def _near(edges: np.ndarray, tolerance: int) -> np.ndarray:
    """Pixels within ``tolerance`` of an edge pixel (dilation by a disc of that radius)."""
    if tolerance <= 0:
        return edges
    size = 2 * tolerance + 1
    disc = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (size, size))
    return cv2.dilate(edges.astype(np.uint8), disc) > 0


def edge_score(reference: np.ndarray, candidate: np.ndarray, tolerance: int) -> EdgeScore:
    """Precision, recall and F1 of ``candidate`` edges (bool H x W) against ``reference`` edges.

    Two empty maps agree perfectly (1.0); one empty map against a non-empty one scores 0.
    """
    reference, candidate = np.asarray(reference, bool), np.asarray(candidate, bool)
    if reference.shape != candidate.shape:
        raise ValueError(f"edge maps differ in size: {reference.shape} vs {candidate.shape}")
    n_ref, n_cand = int(reference.sum()), int(candidate.sum())
    if n_ref == 0 and n_cand == 0:
        return EdgeScore(1.0, 1.0, 1.0)
    if n_ref == 0 or n_cand == 0:
        return EdgeScore(0.0, 0.0, 0.0)
    precision = float((candidate & _near(reference, tolerance)).sum()) / n_cand
    recall = float((reference & _near(candidate, tolerance)).sum()) / n_ref
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return EdgeScore(precision, recall, f1)
