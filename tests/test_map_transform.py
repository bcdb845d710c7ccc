"""Moving control maps and (map, photo) pairs: mirror, zoom out, shift; a pair's map stays its photo's map."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from stages.controlnet_train import augmentation
from stages.lib.config.schema import ControlNetConfig, PairAugmentConfig
from stages.lib.imaging.annotators import annotate_pixels, canny, canny_edges, get_annotator
from stages.lib.imaging.images import to_pixels
from stages.lib.imaging.map_transform import (
    Transform,
    random_transform,
    transform_box,
    transform_map,
    transform_map_image,
    transform_pairs,
    transform_photo,
)
from stages.lib.metrics.edge_metrics import edge_score
from stages.lib.training.data import ImageSet

MOVES = [
    Transform(mirror=True),
    Transform(shift_x=0.2, shift_y=-0.1),
    Transform(scale=0.75),
    Transform(mirror=True, scale=0.7, shift_x=-0.15, shift_y=0.1),
]


def _photo(size: int = 64) -> np.ndarray:
    """An asymmetric scene: a bright rectangle left of centre and a grey bar at the top right."""
    a = np.full((size, size, 3), 40, np.uint8)
    a[16:48, 10:30] = 230
    a[8:14, 40:58] = 150
    return a


def test_identity_leaves_maps_and_photos_as_they_are() -> None:
    photo, edges = _photo(), np.asarray(canny(Image.fromarray(_photo())))
    assert Transform().is_identity
    assert transform_photo(photo, Transform()) is photo and transform_map(edges, Transform()) is edges
    assert transform_box((1, 2, 3, 4), Transform(), 64, 64) == (1, 2, 3, 4)


def test_mirror_and_whole_pixel_shifts_move_a_map_exactly() -> None:
    edges = np.asarray(canny(Image.fromarray(_photo())))
    assert np.array_equal(transform_map(edges, Transform(mirror=True)), edges[:, ::-1])
    moved = transform_map(edges, Transform(shift_x=0.125, shift_y=-0.0625))  # 8 px right, 4 px up
    expected = np.zeros_like(edges)
    expected[:-4, 8:] = edges[4:, :-8]
    assert np.array_equal(moved, expected)


def test_zoomed_out_map_keeps_thin_connected_edges_about_the_centre() -> None:
    edges = np.zeros((64, 64), np.uint8)
    edges[10, 4:60] = 255  # a 56-px line
    moved = transform_map(edges, Transform(scale=0.5))
    rows, cols = np.nonzero(moved)
    assert set(rows) == {21}  # 31.5 + 0.5 * (10 - 31.5), one pixel thick
    assert np.array_equal(cols, np.arange(cols.min(), cols.max() + 1)) and 27 <= len(cols) <= 29  # no gaps
    assert abs((cols.min() + cols.max()) / 2 - 31.5) <= 0.5  # centred as before
    assert moved.dtype == edges.dtype and moved.shape == edges.shape


@pytest.mark.parametrize("move", MOVES, ids=str)
def test_a_moved_pairs_map_is_the_moved_photos_map(move: Transform) -> None:
    """transform_pairs moves photo and map alike: the canny map of the moved photo agrees with the moved map."""
    pixels = to_pixels([Image.fromarray(_photo())])
    maps = annotate_pixels(pixels, get_annotator("canny", 100, 200))
    moved_pixels, moved_maps = transform_pairs(pixels, maps, [move])
    assert moved_pixels.shape == pixels.shape and moved_maps.shape == maps.shape
    assert moved_pixels.dtype == pixels.dtype and moved_maps.dtype == maps.dtype
    photo = ((moved_pixels[0].permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).byte().numpy()
    redrawn = canny_edges(photo, 100, 200)
    assert edge_score(moved_maps[0, 0].numpy() > 0, redrawn, 1).f1 > 0.9
    unmoved = edge_score(maps[0, 0].numpy() > 0, redrawn, 1).f1
    assert unmoved < 0.6, f"{move} should move the layout (F1 against the unmoved map {unmoved:.2f})"


def test_pairs_are_moved_row_by_row_and_counts_must_match() -> None:
    pixels = torch.rand(2, 3, 32, 32) * 2 - 1
    maps = (torch.rand(2, 3, 32, 32) > 0.9).float()
    out_pixels, out_maps = transform_pairs(pixels, maps, [Transform(), Transform(mirror=True)])
    assert torch.equal(out_pixels[0], pixels[0]) and torch.equal(out_maps[0], maps[0])
    assert torch.allclose(out_pixels[1], pixels[1].flip(-1)) and torch.equal(out_maps[1], maps[1].flip(-1))
    with pytest.raises(ValueError, match="1 transforms for 2 photos"):
        transform_pairs(pixels, maps, [Transform()])


def test_map_image_and_face_box_move_with_the_photo() -> None:
    image = canny(Image.fromarray(_photo()))
    move = Transform(scale=0.5, shift_x=0.25)
    moved = transform_map_image(image, move)
    assert moved.size == image.size and moved.mode == "RGB"
    cols = np.nonzero(np.asarray(moved)[..., 0])[1]
    left, top, right, bottom = transform_box((10, 16, 30, 48), move, 64, 64)
    assert (left, right) == (37, 47) and (top, bottom) == (24, 40)  # the rectangle's box, halved and moved
    assert cols.min() >= left - 1
    assert transform_box((0, 0, 8, 8), Transform(shift_x=0.5), 64, 64) == (32, 0, 40, 8)
    assert transform_box((56, 0, 64, 8), Transform(shift_x=0.5), 64, 64) is None  # moved out of the image


def test_random_transforms_are_seeded_and_stay_in_range() -> None:
    def draw(seed: int) -> list[Transform]:
        g = torch.Generator().manual_seed(seed)
        return [random_transform(g, True, 0.7, 0.15) for _ in range(200)]

    moves = draw(0)
    assert moves == draw(0) and moves != draw(1)
    assert all(0.7 <= t.scale <= 1 and abs(t.shift_x) <= 0.15 and abs(t.shift_y) <= 0.15 for t in moves)
    assert 60 < sum(t.mirror for t in moves) < 140
    g = torch.Generator().manual_seed(0)
    assert not any(random_transform(g, False, 1.0, 0.0).mirror for _ in range(20))


def test_controlnet_augmentation_adds_moved_copies_of_each_pair() -> None:
    photos = torch.stack([to_pixels([Image.fromarray(np.roll(_photo(), k, axis=1))])[0] for k in (0, 5, 9)])
    maps = annotate_pixels(photos, get_annotator("canny", 100, 200))
    images = ImageSet(photos, ["a", "b", "c"], [(10, 16, 30, 48), None, (0, 0, 4, 4)], ["x", "", "z"])
    s = ControlNetConfig()
    assert augmentation(s, 0) is None  # the schema's default: the pairs as they are
    s.augment = PairAugmentConfig(copies=2, min_scale=0.7, max_shift=0.15)
    out, out_maps = augmentation(s, 0)(images, maps)
    assert len(out) == out_maps.shape[0] == 9 and out.pixels.shape[1:] == photos.shape[1:]
    assert torch.equal(out.pixels[:3], photos) and torch.equal(
        out_maps[:3], maps
    )  # the pairs themselves first
    assert out.names[3:] == ["a#1", "b#1", "c#1", "a#2", "b#2", "c#2"]
    assert out.captions == ["x", "", "z"] * 3 and len(out.face_boxes) == 9 and out.face_boxes[4] is None
    for k in range(3, 9):  # each copy: a moved photo, the same move of its map
        assert not torch.equal(out.pixels[k], photos[k % 3])
        photo = ((out.pixels[k].permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).byte().numpy()
        assert edge_score(out_maps[k, 0].numpy() > 0, canny_edges(photo, 100, 200), 1).f1 > 0.85
    again, _ = augmentation(dataclasses.replace(s), 0)(images, maps)
    assert torch.equal(again.pixels, out.pixels)  # seeded
