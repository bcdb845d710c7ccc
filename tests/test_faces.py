"""Face detection and focal-point crops (stages/lib/imaging/faces.py)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw

from stages.lib.imaging.faces import (
    Box,
    detect_faces,
    face_detection_rate,
    focal_crop,
    salient_point,
    square_box,
)

ASTRONAUT_FACE = Box(177, 66, 272, 161)  # where the Haar cascade finds it in skimage's 512x512 photo
FACE_PATCH = (140, 20, 320, 200)  # astronaut crop pasted into synthetic scenes (face plus margin)


def astronaut() -> Image.Image:
    """scikit-image's bundled astronaut photo (a real face)."""
    data = pytest.importorskip("skimage.data")
    return Image.fromarray(data.astronaut())


def face_scene(
    size: tuple[int, int] = (900, 600), at: tuple[int, int] = (640, 360)
) -> tuple[Image.Image, Box]:
    """A noisy grey canvas with the astronaut's face pasted off centre; returns it and the true face box."""
    rng = np.random.default_rng(0)
    canvas = Image.fromarray(rng.normal(128, 10, (size[1], size[0], 3)).clip(0, 255).astype(np.uint8))
    canvas.paste(astronaut().crop(FACE_PATCH), at)
    dx, dy = at[0] - FACE_PATCH[0], at[1] - FACE_PATCH[1]
    face = ASTRONAUT_FACE
    return canvas, Box(face.left + dx, face.top + dy, face.right + dx, face.bottom + dy)


def object_scene(
    size: tuple[int, int] = (900, 500), centre: tuple[int, int] = (760, 240)
) -> tuple[Image.Image, Box]:
    """A flat background with one bright disc off centre (no face); returns it and the disc's box."""
    image = Image.new("RGB", size, (70, 80, 90))
    disc = Box(centre[0] - 40, centre[1] - 40, centre[0] + 40, centre[1] + 40)
    ImageDraw.Draw(image).ellipse(disc.as_list(), fill=(250, 230, 40))
    return image, disc


def overlap(a: Box, b: Box) -> float:
    """Intersection over the area of ``b``."""
    w = max(0, min(a.right, b.right) - max(a.left, b.left))
    h = max(0, min(a.bottom, b.bottom) - max(a.top, b.top))
    return w * h / b.area


def test_detects_the_astronaut_face() -> None:
    faces = detect_faces(astronaut())
    assert len(faces) == 1
    assert overlap(faces[0], ASTRONAUT_FACE) > 0.8


def test_detects_faces_in_arrays_and_thumbnails() -> None:
    assert detect_faces(np.asarray(astronaut()))
    assert detect_faces(astronaut().resize((64, 64)))


def test_min_face_fraction_ignores_small_faces() -> None:
    assert detect_faces(astronaut(), min_face_fraction=0.1)
    assert detect_faces(astronaut(), min_face_fraction=0.3) == []


def test_focal_crop_centres_on_an_off_centre_face() -> None:
    image, face = face_scene()
    crop = focal_crop(image, face_padding=1.8, min_face_fraction=0.05)
    assert crop.method == "face"
    assert crop.face is not None and overlap(crop.face, face) > 0.8
    assert crop.box.width == crop.box.height == round(max(crop.face.width, crop.face.height) * 1.8)
    assert crop.box.contains(face)
    assert np.allclose(crop.box.center, face.center, atol=6)
    assert Box(0, 0, *image.size).contains(crop.box)


def test_focal_crop_min_side_and_clamping() -> None:
    image, face = face_scene(size=(900, 600), at=(700, 400))
    crop = focal_crop(image, min_side=500)
    assert crop.method == "face" and crop.box.width == crop.box.height == 500
    assert crop.box.contains(face) and Box(0, 0, 900, 600).contains(crop.box)
    huge = focal_crop(image, face_padding=20.0)
    assert huge.box.width == 600  # clamped to the short side


def test_focal_crop_falls_back_to_saliency() -> None:
    image, disc = object_scene()
    point = salient_point(image)
    assert point is not None and np.allclose(point, disc.center, atol=10)
    crop = focal_crop(image)
    assert crop.method == "saliency" and crop.face is None
    assert crop.box.width == crop.box.height == 500
    assert crop.box.contains(disc)
    assert crop.box != square_box((450, 250), 500, 900, 500)  # not the centre crop


def test_flat_image_gets_a_centre_crop() -> None:
    crop = focal_crop(Image.new("RGB", (300, 200), (20, 120, 60)))
    assert crop.method == "center"
    assert crop.box == Box(50, 0, 250, 200)


@pytest.mark.parametrize(
    ("centre", "expected"),
    [
        ((10, 10), Box(0, 0, 100, 100)),
        ((395, 295), Box(300, 200, 400, 300)),
        ((200, 150), Box(150, 100, 250, 200)),
    ],
)
def test_square_box_stays_inside_the_image(centre: tuple[int, int], expected: Box) -> None:
    assert square_box(centre, 100, 400, 300) == expected


def test_box_in_crop_coordinates() -> None:
    face = Box(120, 140, 180, 200)
    crop = Box(100, 100, 300, 300)
    assert face.in_crop(crop, 100) == Box(10, 20, 40, 50)
    assert Box(50, 50, 150, 150).in_crop(crop, 100) == Box(0, 0, 25, 25)  # clipped to the crop


def test_face_detection_rate() -> None:
    flat = Image.new("RGB", (128, 128), "white")
    assert face_detection_rate([astronaut(), flat]) == 0.5
    assert face_detection_rate([]) == 0.0
