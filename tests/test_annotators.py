"""The canny annotator and the edge-agreement metric on synthetic shapes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from stages.lib.imaging.annotators import AnnotatorError, annotate_pixels, canny, canny_edges, get_annotator
from stages.lib.metrics.edge_metrics import edge_score, tolerance_pixels


def _square(size: int = 64, lo: int = 20, hi: int = 44) -> Image.Image:
    a = np.zeros((size, size, 3), np.uint8)
    a[lo:hi, lo:hi] = 255
    return Image.fromarray(a)


def _border(size: int = 64, lo: int = 20, hi: int = 44) -> np.ndarray:
    """Pixels of the square's boundary (its outermost pixels and the background pixels just outside)."""
    inside = np.zeros((size, size), bool)
    inside[lo:hi, lo:hi] = True
    grown = np.zeros_like(inside)
    grown[lo - 1 : hi + 1, lo - 1 : hi + 1] = True
    shrunk = np.zeros_like(inside)
    shrunk[lo + 1 : hi - 1, lo + 1 : hi - 1] = True
    return grown & ~shrunk


def test_canny_square_edges_lie_on_its_border_and_close_it() -> None:
    edges = canny_edges(_square(), 100, 200)
    border = _border()
    assert edges.any()
    assert not (edges & ~border).any(), "every edge pixel lies within 1 px of the square's border"
    rows, cols = np.nonzero(edges)
    assert (
        rows.min() in (19, 20)
        and rows.max() in (43, 44)
        and cols.min() in (19, 20)
        and cols.max() in (43, 44)
    )
    for i in range(22, 42):  # every side is found along its whole length
        assert (
            edges[i, 19:21].any()
            and edges[i, 43:45].any()
            and edges[19:21, i].any()
            and edges[43:45, i].any()
        )


def test_canny_map_is_three_channel_black_and_white_like_diffusers_examples() -> None:
    control = canny(_square(), 100, 200)
    a = np.asarray(control)
    assert control.mode == "RGB" and control.size == (64, 64)
    assert set(np.unique(a)) == {0, 255} and (a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all()


def test_empty_and_flat_images_have_no_edges() -> None:
    assert not canny_edges(Image.new("RGB", (64, 64)), 100, 200).any()
    assert not canny_edges(Image.new("RGB", (64, 64), (120, 30, 200)), 100, 200).any()


def test_thresholds_select_strong_edges_only() -> None:
    a = np.zeros((64, 64, 3), np.uint8)
    a[:, 32:] = 40  # a weak step: Sobel magnitude 4 * 40 = 160
    weak = Image.fromarray(a)
    assert canny_edges(weak, 100, 150).any() and not canny_edges(weak, 100, 200).any()
    with pytest.raises(AnnotatorError, match="low_threshold"):
        canny_edges(weak, 200, 100)


def test_unknown_annotator_names_the_key_and_the_choices() -> None:
    with pytest.raises(AnnotatorError, match=r"controlnet.annotator='depth'.*canny"):
        get_annotator("depth", 100, 200)


def test_annotate_pixels_gives_unit_range_maps_aligned_with_the_images() -> None:
    pixels = torch.from_numpy(np.asarray(_square(), np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    maps = annotate_pixels(pixels.repeat(2, 1, 1, 1), get_annotator("canny", 100, 200))
    assert maps.shape == (2, 3, 64, 64) and maps.min() == 0 and maps.max() == 1
    assert torch.equal(maps[0, 0] > 0, torch.from_numpy(canny_edges(_square(), 100, 200)))


# -- the metric -----------------------------------------------------------------------------------------------


def test_identical_maps_score_one_and_far_disjoint_maps_zero() -> None:
    edges = canny_edges(_square(), 100, 200)
    assert edge_score(edges, edges, 1).f1 == 1.0
    far = np.zeros_like(edges)
    far[2, 2:10] = True
    assert edge_score(edges, far, 2).f1 == 0.0


def test_shift_within_tolerance_scores_one_and_beyond_it_less() -> None:
    edges = canny_edges(_square(), 100, 200)
    shifted = np.roll(edges, 1, axis=1)
    assert edge_score(edges, shifted, 1).f1 == 1.0
    assert edge_score(edges, shifted, 0).f1 < 0.7
    assert edge_score(edges, np.roll(edges, 4, axis=0), 1).f1 < 0.5


def test_precision_and_recall_separate_extra_from_missing_edges() -> None:
    edges = canny_edges(_square(), 100, 200)
    extra = edges.copy()
    extra[5:60, 5] = True  # a spurious line
    score = edge_score(edges, extra, 1)
    assert score.recall == 1.0 and score.precision < 1.0
    half = edges.copy()
    half[:32] = False
    score = edge_score(edges, half, 1)
    assert score.precision == 1.0 and score.recall < 0.7


def test_empty_maps_and_tolerance_from_image_size() -> None:
    empty = np.zeros((8, 8), bool)
    some = empty.copy()
    some[4, 4] = True
    assert edge_score(empty, empty, 1).f1 == 1.0 and edge_score(empty, some, 1).f1 == 0.0
    assert tolerance_pixels(64, 64) == 1 and tolerance_pixels(512, 512) == 5
    with pytest.raises(ValueError, match="differ in size"):
        edge_score(empty, np.zeros((4, 4), bool), 1)
