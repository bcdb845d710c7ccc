"""dlib's face detector and identity score on this machine: timings, the real photos' figures, the miniature world.

Measures (docs/faces.md): detection time per photo (dlib HOG + 5-point embedding as prep runs it, against the Haar
cascade), embedding time per generated image (what compare spends per image), the embedding distances of the
astronaut's and Grace Hopper's changed copies, and what dlib makes of the miniature world's drawn faces (the sample
subject's photos and 64 px world images of the subject and of other people, per style).

    OMP_NUM_THREADS=1 python -m benchmarks.faces --out benchmarks/results/faces_cpu.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from stages.lib.config.schema import SampleSubjectConfig
from stages.lib.imaging import face_detection
from stages.lib.imaging.faces import detect_faces
from stages.lib.metrics.identity import embed_largest
from stages.lib.miniature.world import SUBJECT_IDENTITY, WorldImage, describe, render
from stages.sample_subject import write_subject
from tests.test_faces import astronaut
from tests.test_identity import TRANSFORMS, grace_hopper


def timed(fn: Callable[[], object], repeats: int = 5) -> float:
    """Median seconds of ``fn()``."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def timings(models: face_detection.DlibFaces) -> dict[str, float]:
    photo, phone = astronaut(), astronaut().resize((4000, 4000), Image.Resampling.BICUBIC)
    generated64 = astronaut().resize((64, 64), Image.Resampling.LANCZOS)
    return {
        "dlib_detect_512px_s": timed(lambda: models.detect(photo)),
        "dlib_detect_and_embed_512px_s": timed(lambda: models.detect(photo, embed=True)),
        "dlib_detect_and_embed_4000px_s": timed(lambda: models.detect(phone, embed=True), 3),
        "haar_detect_512px_s": timed(lambda: detect_faces(photo)),
        "embed_generated_512px_s": timed(lambda: embed_largest(models, photo)),
        "embed_generated_64px_s": timed(lambda: embed_largest(models, generated64)),
    }


def real_photos(models: face_detection.DlibFaces) -> dict[str, dict[str, float | None]]:
    """Distance of each changed copy to both people's originals."""
    originals = {"astronaut": astronaut(), "grace_hopper": grace_hopper()}
    refs = {name: embed_largest(models, im) for name, im in originals.items()}
    rows: dict[str, dict[str, float | None]] = {}
    for name, image in originals.items():
        for transform, fn in {"original": lambda im: im, **TRANSFORMS}.items():
            vector = embed_largest(models, fn(image))
            rows[f"{name} {transform}"] = {
                f"to_{ref}": None if vector is None else round(float(np.linalg.norm(vector - r)), 3)
                for ref, r in refs.items()
            }
    return rows


def nearest(vectors: list, references: np.ndarray) -> list[float]:
    """Each face's distance to the nearest reference (images without a face left out)."""
    return [float(face_detection.distances(v, references).min()) for v in vectors if v is not None]


def miniature(models: face_detection.DlibFaces, count: int = 12) -> dict[str, object]:
    """Detection rate on the sample subject's photos; per style, on 64 px world images of the subject and of
    others, the detection rate and the distance to the nearest of the subject's first six images."""
    with tempfile.TemporaryDirectory() as folder:
        paths = write_subject(SampleSubjectConfig(), Path(folder))
        photos = [ImageOps.exif_transpose(Image.open(p)).convert("RGB") for p in paths]
    out: dict[str, object] = {
        "sample_subject_detected": f"{sum(bool(models.detect(p)) for p in photos)}/{len(photos)}"
    }
    for style in ("photo", "anime", "classicist"):
        subject = [
            render(WorldImage(SUBJECT_IDENTITY, "plain", style, ""), 64, np.random.default_rng([1, i]))
            for i in range(count)
        ]
        others = [
            render(WorldImage(describe(0, i).identity, "plain", style, ""), 64, np.random.default_rng([2, i]))
            for i in range(count)
        ]
        subj, oth = (
            [embed_largest(models, im) for im in subject],
            [embed_largest(models, im) for im in others],
        )
        refs = [v for v in subj[: count // 2] if v is not None]
        row: dict[str, object] = {
            "subject_detected": f"{sum(v is not None for v in subj)}/{count}",
            "others_detected": f"{sum(v is not None for v in oth)}/{count}",
        }
        if refs:
            same, other = nearest(subj[count // 2 :], np.stack(refs)), nearest(oth, np.stack(refs))
            row |= {
                "subject_median_distance": round(statistics.median(same), 3) if same else None,
                "others_median_distance": round(statistics.median(other), 3) if other else None,
                "others_within_0.6": f"{sum(d < 0.6 for d in other)}/{len(other)}",
            }
        out[style] = row
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="JSON file for the results")
    args = parser.parse_args()
    models = face_detection.load()
    if models is None:
        raise SystemExit(f"error: {face_detection.unavailable_reason()}")
    results = {"timings": timings(models), "real_photos": real_photos(models), "miniature": miniature(models)}
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
