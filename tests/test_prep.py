"""The prep stage: focal-point crops, input formats, bad inputs, atomic outputs (stages/prep.py)."""

from __future__ import annotations

import hashlib
import io
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stages.compare import identity_scores, load_identity
from stages.lib.config.loader import save_params
from stages.lib.config.schema import PipelineConfig
from stages.lib.errors import ConfigError, StageError
from stages.lib.imaging import face_detection
from stages.lib.imaging.faces import Box
from stages.lib.imaging.manifest import MANIFEST, Manifest
from stages.lib.metrics.image_metrics import MetricSuite, load_references
from stages.prep import main, run
from stages.sample_subject import save_photo
from tests.test_faces import astronaut, face_scene, object_scene
from tests.test_identity import TRANSFORMS, grace_hopper, group_photo, write_infer_index

RES = 64


@pytest.fixture
def cfg() -> PipelineConfig:
    """Seed defaults at the tiny resolution, tracking off."""
    config = PipelineConfig()
    config.tracking.enabled = False
    config.prep.resolution = RES
    return config


def noise(seed: int, size: tuple[int, int] = (120, 90)) -> Image.Image:
    """A distinct random RGB photo."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def encoded(image: Image.Image, fmt: str, **kw: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kw)
    return buffer.getvalue()


def write(folder: Path, name: str, data: bytes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(data)
    return folder / name


def digest(folder: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under ``folder``."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in folder.rglob("*")
        if p.is_file()
    }


def prep(cfg: PipelineConfig, inp: Path, tmp_path: Path) -> tuple[dict[str, int], Manifest]:
    metrics = run(cfg, inp, tmp_path / "out", tmp_path / "reports")
    return metrics, Manifest.read(tmp_path / "out" / MANIFEST)


BAD_FILES: dict[str, tuple[str, str]] = {  # name -> (reason code, words of the message)
    "corrupt.jpg": ("corrupt", "corrupt or truncated"),
    "empty.png": ("corrupt", "empty file"),
    "text.jpg": ("not_an_image", "not an image"),
    "notes.txt": ("not_an_image", "not an image"),
    "small.png": ("too_small", "too small: 40x30 px"),
    "same_file.jpg": ("duplicate", "duplicate of good.jpg (identical file)"),
    "same_pixels.png": ("duplicate", "duplicate of good2.png (identical pixels)"),
    "blank.png": ("blank", "blank: every pixel is about the same colour (RGB (40, 90, 200))"),
    "black16.png": ("blank", "blank: every pixel is about the same colour (RGB (0, 0, 0))"),
    "a_folder.jpg": ("not_a_file", "a folder, not a photo"),
    "dangling.jpg": ("not_a_file", "broken symlink to missing.jpg (no such file): fix or remove the link"),
}


def make_bad(folder: Path, name: str) -> Path:
    """Write the bad file ``name`` (see BAD_FILES) next to the good files it may refer to."""
    folder.mkdir(parents=True, exist_ok=True)
    if name == "a_folder.jpg":
        write(folder / name, "inner.jpg", encoded(noise(5), "JPEG"))
        return folder / name
    if name == "dangling.jpg":
        (folder / name).symlink_to("missing.jpg")
        return folder / name
    good = encoded(noise(1), "JPEG", quality=90)
    data = {
        "corrupt.jpg": good[: len(good) // 2],
        "empty.png": b"",
        "text.jpg": b"this is a text file, not a JPEG\n",
        "notes.txt": b"some notes\n",
        "small.png": encoded(noise(9, (40, 30)), "PNG"),
        "same_file.jpg": good,
        "same_pixels.png": encoded(noise(2), "PNG", compress_level=1),
        "blank.png": encoded(Image.new("RGB", (100, 80), (40, 90, 200)), "PNG"),
        # a 16-bit PNG of values near 0 (a dark, 12-bit-like exposure read as 16-bit): black once made 8-bit
        "black16.png": encoded(Image.fromarray(np.full((80, 100), 100, dtype=np.uint16)), "PNG"),
    }[name]
    return write(folder, name, data)


def make_good(folder: Path) -> None:
    write(folder, "good.jpg", encoded(noise(1), "JPEG", quality=90))
    write(folder, "good2.png", encoded(noise(2), "PNG", compress_level=9))


def test_face_photo_is_cropped_on_the_face(cfg: PipelineConfig, tmp_path: Path) -> None:
    image, face = face_scene()
    write(tmp_path / "in", "portrait.jpg", encoded(image, "JPEG", quality=95))
    metrics, manifest = prep(cfg, tmp_path / "in", tmp_path)
    entry = manifest.images[0]
    assert (metrics["num_face"], metrics["num_accepted"], entry.method) == (1, 1, "face")
    assert (metrics["num_face_dlib"], entry.detector, entry.num_faces, entry.placed_by) == (
        1,
        "dlib",
        1,
        "dlib face",
    )
    crop = Box(*entry.crop_box)
    assert crop.contains(face) and np.allclose(crop.center, face.center, atol=8)
    out = Box(*entry.face_box_output)
    assert Box(0, 0, RES, RES).contains(out) and np.allclose(out.center, (RES / 2, RES / 2), atol=3)
    with Image.open(tmp_path / "out" / entry.output) as saved:
        assert (saved.mode, saved.size) == ("RGB", (RES, RES))
    assert entry.output == "000_portrait.png" and entry.original_size == [900, 600]


def test_saliency_crop_and_reports(cfg: PipelineConfig, tmp_path: Path) -> None:
    image, disc = object_scene()
    write(tmp_path / "in", "object.png", encoded(image, "PNG"))
    metrics, manifest = prep(cfg, tmp_path / "in", tmp_path)
    assert metrics["num_saliency"] == 1 and manifest.images[0].face_box_output is None
    assert metrics["num_no_face"] == 1 and manifest.images[0].placed_by == "saliency"
    assert Box(*manifest.images[0].crop_box).contains(disc)
    assert (tmp_path / "reports" / "contact_sheet.png").is_file()
    assert (tmp_path / "reports" / "metrics.json").is_file()


def test_group_photo_is_cropped_on_the_subjects_face(cfg: PipelineConfig, tmp_path: Path) -> None:
    """Grace Hopper's face is the largest in the group photo; the astronaut's is the one the folder shows."""
    photo, head = group_photo()
    write(tmp_path / "in", "a_mirror.jpg", encoded(TRANSFORMS["mirror"](astronaut()), "JPEG", quality=92))
    write(tmp_path / "in", "b_group.jpg", encoded(photo, "JPEG", quality=92))
    write(tmp_path / "in", "c_small.png", encoded(TRANSFORMS["half size"](astronaut()), "PNG"))
    metrics, manifest = prep(cfg, tmp_path / "in", tmp_path)
    assert [e.source for e in manifest.images] == ["a_mirror.jpg", "b_group.jpg", "c_small.png"]
    group = manifest.images[1]
    assert (group.output, group.detector, group.num_faces) == ("001_b_group.png", "dlib", 2)
    crop, face = Box(*group.crop_box), Box(*group.face_box)
    assert head.contains(face) and np.allclose(crop.center, face.center, atol=2)
    assert crop.left > 426  # nothing of Grace Hopper (x < 426) in the crop
    assert metrics["num_face_dlib"] == 3


def test_require_face_rejects_photos_without_a_face(cfg: PipelineConfig, tmp_path: Path) -> None:
    write(tmp_path / "in", "face.png", encoded(face_scene()[0], "PNG"))
    write(tmp_path / "in", "object.png", encoded(object_scene()[0], "PNG"))
    cfg.prep.require_face = True
    metrics, manifest = prep(cfg, tmp_path / "in", tmp_path)
    assert [e.source for e in manifest.images] == ["face.png"]
    (rejection,) = manifest.rejected
    assert (rejection.file, rejection.reason) == ("object.png", "no_face")
    assert "no face found" in rejection.message and "prep.require_face=false" in rejection.message
    assert (metrics["num_rejected_no_face"], metrics["num_no_face"]) == (1, 0)
    cfg.prep.on_bad_input = "fail"
    with pytest.raises(StageError, match=r"object\.png: no face found .*prep\.require_face=false"):
        run(cfg, tmp_path / "in", tmp_path / "out2", tmp_path / "reports2")


def test_without_dlib_the_haar_cascade_places_the_crop(
    cfg: PipelineConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where dlib is not installed prep still runs, on the Haar cascade, and says so."""
    monkeypatch.setitem(sys.modules, "dlib", None)  # import dlib raises ImportError
    face_detection.reset()
    try:
        image, face = face_scene()
        write(tmp_path / "in", "portrait.jpg", encoded(image, "JPEG", quality=95))
        metrics, manifest = prep(cfg, tmp_path / "in", tmp_path)
    finally:
        monkeypatch.undo()
        face_detection.reset()
    entry = manifest.images[0]
    assert (entry.method, entry.detector, entry.placed_by) == ("face", "haar", "haar face")
    assert (metrics["num_face_haar"], metrics["num_face_dlib"]) == (1, 0)
    assert manifest.face_detector.startswith("Haar cascade only: dlib is not installed")
    assert np.allclose(Box(*entry.crop_box).center, face.center, atol=8)


def test_photo_folder_through_prep_and_compares_identity_score(cfg: PipelineConfig, tmp_path: Path) -> None:
    """Photos of the astronaut (and one without a face) through prep, then compare's identity score of
    "generated" images: her rotated and re-encoded copies match, Grace Hopper does not, a blank image has no face."""
    cfg.prep.resolution = 160
    photo = astronaut()
    write(tmp_path / "in", "a.png", encoded(photo, "PNG"))
    write(tmp_path / "in", "b.jpg", encoded(TRANSFORMS["mirror"](photo), "JPEG", quality=90))
    write(tmp_path / "in", "c.png", encoded(photo.resize((400, 400), Image.Resampling.LANCZOS), "PNG"))
    write(tmp_path / "in", "d.png", encoded(object_scene()[0], "PNG"))
    metrics, _ = prep(cfg, tmp_path / "in", tmp_path)
    assert (metrics["num_face_dlib"], metrics["num_no_face"]) == (3, 1)

    token = cfg.data.instance_token
    generated = {
        f"a photo of {token} woman": [TRANSFORMS["rotated 30 degrees"](photo), TRANSFORMS["jpeg q40"](photo)],
        f"{token} in a painting": [grace_hopper(), Image.new("RGB", (160, 160), "white")],
        "a photo of a dog": [TRANSFORMS["mirror"](photo)],  # no instance token: not scored
    }
    index = write_infer_index(tmp_path / "infer", generated, [grace_hopper()], "v")
    suite = MetricSuite(load_references(tmp_path / "out"))
    scorer, notes = load_identity(suite, index, miniature=False)
    assert scorer is not None and notes == [
        "identity references: dlib finds a face in 3 of 4 prepared photos"
    ]
    scores = identity_scores(scorer, index, "v", token)
    assert (scores["identity_match_rate"], scores["identity_no_face"]) == (0.5, 1.0)
    assert (scores["class_identity_match_rate"], scores["class_identity_no_face"]) == (0.0, 0.0)
    matches = scorer.matches([im for p in list(generated)[:2] for im in generated[p]])
    assert [m.distance is not None and m.distance < 0.35 for m in matches] == [True, True, False, False]
    assert 0.6 < matches[2].distance < 0.8 and matches[3].distance is None
    assert scores["identity_similarity"] == pytest.approx(sum(m.similarity or 0 for m in matches) / 4)
    assert 0.7 < scores["identity_similarity"] < 0.75  # three faces near 0.9-1.0 cosine, one image scoring 0
    assert 0.3 < scores["identity_distance"] < 0.45 and 0.6 < scores["class_identity_distance"] < 0.8


def test_exif_orientation_is_applied(cfg: PipelineConfig, tmp_path: Path) -> None:
    image, _ = face_scene(size=(500, 360), at=(300, 150))
    (tmp_path / "in").mkdir()
    for orientation in range(1, 9):
        save_photo(image, tmp_path / "in" / f"o{orientation}.jpg", orientation)
    _, manifest = prep(cfg, tmp_path / "in", tmp_path)
    assert len(manifest.images) == 8
    for entry in manifest.images:
        assert entry.original_size == [500, 360], entry.source
        assert entry.method == "face", entry.source  # a sideways face is not detected


QUADRANTS = [(220, 30, 30), (30, 200, 30), (30, 30, 220), (230, 220, 30)]  # TL, TR, BL, BR


def quadrant_image(size: int = 100) -> Image.Image:
    image = Image.new("RGB", (size, size))
    half = size // 2
    for i, colour in enumerate(QUADRANTS):
        image.paste(colour, ((i % 2) * half, (i // 2) * half, (i % 2 + 1) * half, (i // 2 + 1) * half))
    return image


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_pixels(cfg: PipelineConfig, tmp_path: Path, orientation: int) -> None:
    (tmp_path / "in").mkdir()
    save_photo(quadrant_image(), tmp_path / "in" / "q.jpg", orientation, quality=95)
    _, manifest = prep(cfg, tmp_path / "in", tmp_path)
    out = np.asarray(Image.open(tmp_path / "out" / manifest.images[0].output), dtype=int)
    for i, colour in enumerate(QUADRANTS):
        x, y = (i % 2) * RES // 2 + RES // 4, (i // 2) * RES // 2 + RES // 4
        assert np.abs(out[y, x] - colour).max() < 40, (orientation, i, out[y, x])


def marked(image: Image.Image) -> Image.Image:
    """``image`` with a contrasting corner block, so that it is not one colour (one-colour images are rejected)."""
    image = image.copy()
    image.paste(Image.new(image.mode, (12, 12), 0).convert(image.mode), (0, 0))
    return image


def mode_samples() -> dict[str, tuple[bytes, tuple[int, int, int]]]:
    """File name -> (encoded image in an unusual mode, the RGB its centre must become)."""
    rgba = Image.new("RGBA", (80, 80), (255, 0, 0, 0))  # fully transparent -> white
    rgba.paste((0, 0, 255, 255), (0, 0, 12, 12))
    cmyk = Image.new("CMYK", (80, 80), (255, 0, 0, 0))  # cyan
    i16 = Image.fromarray(np.full((80, 80), 32768, dtype=np.uint16))
    palette = marked(Image.new("RGB", (80, 80), (10, 200, 10))).convert("P", palette=Image.Palette.ADAPTIVE)
    return {
        "rgba.png": (encoded(rgba, "PNG"), (255, 255, 255)),
        "gray.png": (encoded(marked(Image.new("L", (80, 80), 100)), "PNG"), (100, 100, 100)),
        "cmyk.jpg": (encoded(marked(cmyk), "JPEG", quality=95), (0, 255, 255)),
        "i16.png": (encoded(marked(i16), "PNG"), (128, 128, 128)),
        "palette.png": (encoded(palette, "PNG"), (10, 200, 10)),
        "photo.webp": (
            encoded(marked(Image.new("RGB", (80, 80), (40, 60, 200))), "WEBP", lossless=True),
            (40, 60, 200),
        ),
    }


def test_modes_become_rgb_squares(cfg: PipelineConfig, tmp_path: Path) -> None:
    samples = mode_samples()
    for name, (data, _) in samples.items():
        write(tmp_path / "in", name, data)
    metrics, manifest = prep(cfg, tmp_path / "in", tmp_path)
    assert metrics["num_accepted"] == len(samples)
    for entry in manifest.images:
        with Image.open(tmp_path / "out" / entry.output) as saved:
            assert (saved.mode, saved.size) == ("RGB", (RES, RES)), entry.source
            pixel = np.asarray(saved)[RES // 2, RES // 2]
        assert np.abs(pixel.astype(int) - samples[entry.source][1]).max() <= 3, (entry.source, pixel)


def gradient(dtype: type, top: float, size: tuple[int, int] = (100, 80)) -> np.ndarray:
    """A left-to-right ramp from 0 to ``top``."""
    return np.tile(np.linspace(0, top, size[0]), (size[1], 1)).astype(dtype)


HIGH_BIT_DEPTH = {  # file name -> (encoded one-channel image of 16-bit, 32-bit or float values)
    "ramp16.png": encoded(Image.fromarray(gradient(np.uint16, 65535)), "PNG"),
    "ramp16.tif": encoded(Image.fromarray(gradient(np.uint16, 65535)), "TIFF"),
    "ramp16be.tif": encoded(Image.frombytes("I;16B", (100, 80), gradient(">u2", 65535).tobytes()), "TIFF"),
    "ramp32.tif": encoded(Image.fromarray(gradient(np.int32, 65535)), "TIFF"),
    "rampf.tif": encoded(Image.fromarray(gradient(np.float32, 1.0)), "TIFF"),
}


@pytest.mark.parametrize("name", list(HIGH_BIT_DEPTH))
def test_high_bit_depth_images_become_full_range_8_bit(
    cfg: PipelineConfig, tmp_path: Path, name: str
) -> None:
    write(tmp_path / "in", name, HIGH_BIT_DEPTH[name])
    cfg.prep.allow_upscale = True  # an 80 px photo, cropped to 80 and resized to RES
    metrics, manifest = prep(cfg, tmp_path / "in", tmp_path)
    assert (metrics["num_accepted"], manifest.rejected) == (1, [])
    with Image.open(tmp_path / "out" / manifest.images[0].output) as saved:
        row = np.asarray(saved.convert("L"), dtype=float)[RES // 2]
    # the 80 px centre crop of a 100 px ramp spans 10..90 % of full range: neither black nor clipped to white
    assert 20 < row[0] < 40 and 215 < row[-1] < 235 and np.all(np.diff(row) > -2), row[::8]


def test_a_symlink_to_a_photo_is_read(cfg: PipelineConfig, tmp_path: Path) -> None:
    make_good(tmp_path / "elsewhere")
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "linked.jpg").symlink_to(tmp_path / "elsewhere" / "good.jpg")
    _, manifest = prep(cfg, tmp_path / "in", tmp_path)
    assert [e.source for e in manifest.images] == ["linked.jpg"] and manifest.rejected == []
    assert (tmp_path / "in" / "linked.jpg").is_symlink()


def test_an_unreadable_photo_is_rejected(
    cfg: PipelineConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_good(tmp_path / "in")
    locked = write(tmp_path / "in", "locked.jpg", encoded(noise(7), "JPEG"))
    locked.chmod(0)
    if os.access(locked, os.R_OK):  # root reads it anyway: refuse the read as the file system would
        read_bytes = Path.read_bytes

        def refuse(path: Path) -> bytes:
            if path.name == locked.name:
                raise PermissionError(13, "Permission denied", str(path))
            return read_bytes(path)

        monkeypatch.setattr(Path, "read_bytes", refuse)
    try:
        _, manifest = prep(cfg, tmp_path / "in", tmp_path)
    finally:
        locked.chmod(0o644)
    [rejection] = manifest.rejected
    assert (rejection.file, rejection.reason) == ("locked.jpg", "unreadable")
    assert "cannot be read (Permission denied): make it readable" in rejection.message


def test_bad_inputs_are_skipped_and_reported(
    cfg: PipelineConfig, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    make_good(tmp_path / "in")
    for name in BAD_FILES:
        make_bad(tmp_path / "in", name)
    before = digest(tmp_path / "in")
    with caplog.at_level(logging.WARNING):
        metrics, manifest = prep(cfg, tmp_path / "in", tmp_path)
    assert digest(tmp_path / "in") == before  # the input folder is never modified
    assert [e.source for e in manifest.images] == ["good.jpg", "good2.png"]
    rejected = {r.file: r for r in manifest.rejected}
    assert set(rejected) == set(BAD_FILES)
    for name, (reason, words) in BAD_FILES.items():
        assert rejected[name].reason == reason and words in rejected[name].message
        assert any(name in line and words in line for line in caplog.messages), name
    assert metrics["num_input"] == 2 + len(BAD_FILES) and metrics["num_rejected"] == len(BAD_FILES)
    assert (metrics["num_rejected_duplicate"], metrics["num_rejected_not_an_image"]) == (2, 2)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["000_good.png", "001_good2.png", MANIFEST]


@pytest.mark.parametrize("name", list(BAD_FILES))
def test_bad_input_stops_the_stage_in_fail_mode(cfg: PipelineConfig, tmp_path: Path, name: str) -> None:
    cfg.prep.on_bad_input = "fail"
    make_good(tmp_path / "in")
    make_bad(tmp_path / "in", name)
    with pytest.raises(StageError, match="prep.on_bad_input=skip") as err:
        prep(cfg, tmp_path / "in", tmp_path)
    assert name in str(err.value) and BAD_FILES[name][1] in str(err.value)
    assert not (tmp_path / "out").exists()


def test_allow_upscale_accepts_small_images(cfg: PipelineConfig, tmp_path: Path) -> None:
    cfg.prep.allow_upscale = True
    make_bad(tmp_path / "in", "small.png")
    metrics, manifest = prep(cfg, tmp_path / "in", tmp_path)
    box = Box(*manifest.images[0].crop_box)
    assert metrics["num_accepted"] == 1 and box.width == box.height == 30  # upscaled to RES


@pytest.mark.parametrize("mode", ["skip", "fail"])
def test_no_usable_images_lists_every_rejected_file(cfg: PipelineConfig, tmp_path: Path, mode: str) -> None:
    cfg.prep.on_bad_input = mode
    for name in ("notes.txt", "small.png"):
        make_bad(tmp_path / "in", name)
    with pytest.raises(StageError) as err:
        prep(cfg, tmp_path / "in", tmp_path)
    message = str(err.value)
    if mode == "skip":
        assert "no usable images" in message and "data.instance_dir" in message
        assert "notes.txt: not an image" in message and "small.png: too small" in message
    else:
        assert "notes.txt" in message and "not an image" in message


@pytest.mark.parametrize("mode", ["skip", "fail"])
@pytest.mark.parametrize(("folder", "words"), [("missing", "does not exist"), ("empty", "is empty")])
def test_missing_or_empty_folder(
    cfg: PipelineConfig, tmp_path: Path, mode: str, folder: str, words: str
) -> None:
    cfg.prep.on_bad_input = mode
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / ".DS_Store").write_bytes(b"\0")  # hidden files do not count
    with pytest.raises(StageError, match=words) as err:
        prep(cfg, tmp_path / folder, tmp_path)
    assert str(tmp_path / folder) in str(err.value) and "data.instance_dir" in str(err.value)


def test_failed_run_keeps_the_previous_output(cfg: PipelineConfig, tmp_path: Path) -> None:
    make_good(tmp_path / "in")
    prep(cfg, tmp_path / "in", tmp_path)
    before = digest(tmp_path / "out")
    cfg.prep.on_bad_input = "fail"
    make_bad(tmp_path / "in", "corrupt.jpg")
    with pytest.raises(StageError, match="corrupt.jpg"):
        prep(cfg, tmp_path / "in", tmp_path)
    assert digest(tmp_path / "out") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "out", "reports"]  # no temporary folder left


def test_output_inside_input_is_refused(cfg: PipelineConfig, tmp_path: Path) -> None:
    make_good(tmp_path / "in")
    with pytest.raises(StageError, match="overlaps the input folder"):
        run(cfg, tmp_path / "in", tmp_path / "in" / "out", tmp_path / "reports")


def test_invalid_prep_config_names_the_key(cfg: PipelineConfig, tmp_path: Path) -> None:
    cfg.prep.on_bad_input = "ignore"
    with pytest.raises(ConfigError, match="prep.on_bad_input='ignore'"):
        prep(cfg, tmp_path, tmp_path)


def write_params(cfg: PipelineConfig, path: Path) -> Path:
    save_params(cfg, path)
    return path


def test_cli(cfg: PipelineConfig, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    params = write_params(cfg, tmp_path / "params.yaml")
    args = ["--params", str(params), "--output", str(tmp_path / "out"), "--reports", str(tmp_path / "rep")]
    assert main([*args, "--input", str(tmp_path / "nope")]) == 2
    assert "error: input folder" in capsys.readouterr().err
    make_good(tmp_path / "in")
    assert main([*args, "--input", str(tmp_path / "in")]) == 0
    assert (tmp_path / "out" / "000_good.png").is_file()


class RecordingTracker:
    """Stands in for the MLflow tracker: records what the stage logs."""

    def __init__(self) -> None:
        self.calls: dict[str, object] = {}

    def log_image(self, image: Image.Image, artifact_file: str) -> None:
        self.calls[artifact_file] = image.size

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self.calls[f"{artifact_path}/{Path(path).name}"] = Path(path).is_file()

    def set_final_metrics(self, metrics: dict[str, int]) -> None:
        self.calls["metrics"] = metrics


def test_tracking_calls(cfg: PipelineConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tracker, seen = RecordingTracker(), {}

    @contextmanager
    def fake_stage_run(
        stage: str, tracking: object, params: dict, reports_dir: Path
    ) -> Iterator[RecordingTracker]:
        seen.update(stage=stage, params=params)
        yield tracker

    monkeypatch.setattr("stages.prep.stage_run", fake_stage_run)
    make_good(tmp_path / "in")
    metrics, _ = prep(cfg, tmp_path / "in", tmp_path)
    assert seen["stage"] == "prep" and seen["params"]["prep.resolution"] == RES
    assert "data.instance_dir" in seen["params"]
    assert tracker.calls["prep/contact_sheet.png"] and tracker.calls["prep/manifest.json"] is True
    assert tracker.calls["metrics"] == metrics


def test_a_caption_beside_a_photo_goes_into_the_manifest(cfg: PipelineConfig, tmp_path: Path) -> None:
    """kohya's convention: good.txt captions good.jpg (whitespace collapsed); good2.png has none; a .txt that
    names no photo is rejected like any other file that is not an image."""
    make_good(tmp_path / "in")
    write(tmp_path / "in", "good.txt", b"  a photo of sks man face\n in a forest\n")
    make_bad(tmp_path / "in", "notes.txt")
    metrics, manifest = prep(cfg, tmp_path / "in", tmp_path)
    captions = {e.source: e.caption for e in manifest.images}
    assert captions == {"good.jpg": "a photo of sks man face in a forest", "good2.png": ""}
    assert metrics["num_input"] == 3 and [r.file for r in manifest.rejected] == ["notes.txt"]


def test_a_caption_without_the_instance_token_is_refused(cfg: PipelineConfig, tmp_path: Path) -> None:
    make_good(tmp_path / "in")
    prep(cfg, tmp_path / "in", tmp_path)
    before = digest(tmp_path / "out")
    write(tmp_path / "in", "good2.txt", b"a photo of a man in a forest\n")
    with pytest.raises(StageError, match=r"good2.txt: the caption .* lacks the instance token 'sks'"):
        prep(cfg, tmp_path / "in", tmp_path)
    assert digest(tmp_path / "out") == before
