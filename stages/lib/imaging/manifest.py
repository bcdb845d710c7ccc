"""prep's ``manifest.json``: the accepted crops (with crop and face boxes) and the rejected inputs.

Written by the prep stage, read by training (face-weighted loss) and reports.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

MANIFEST = "manifest.json"
METHODS = ("face", "saliency", "center")
DETECTORS = ("dlib", "haar")  # which detector found the face of a "face" crop
REASONS = (
    "corrupt",
    "not_an_image",
    "unsupported_format",
    "too_small",
    "blank",
    "duplicate",
    "no_face",
    "not_a_file",
    "unreadable",
)


@dataclass
class Rejection:
    """A skipped input file."""

    file: str
    reason: str
    message: str


@dataclass
class ManifestEntry:
    """One accepted photo; boxes are ``[left, top, right, bottom]``."""

    output: str  # crop file name in the output folder
    source: str  # input file name
    sha256: str  # of the file bytes
    pixel_sha256: str  # of the decoded RGB pixels (after EXIF orientation)
    original_size: list[int]  # [width, height] after EXIF orientation
    crop_box: list[int]  # in original pixels
    method: str  # face | saliency | center
    face_box: list[int] | None  # in original pixels
    face_box_output: list[int] | None  # in the output crop's pixels (resolution x resolution)
    # the photo's own caption (``<photo>.txt`` beside it); "" trains the photo on data.instance_prompt
    caption: str = ""
    detector: str = ""  # method "face": which detector found it, dlib | haar
    num_faces: int = 0  # faces dlib found in the photo (the subject's is face_box when there are several)

    @property
    def placed_by(self) -> str:
        """What placed the crop: "dlib face", "haar face", "saliency" or "center"."""
        return f"{self.detector} face" if self.method == "face" and self.detector else self.method


@dataclass
class Manifest:
    """``manifest.json``: what prep accepted and rejected."""

    resolution: int
    images: list[ManifestEntry] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)
    face_detector: str = (
        ""  # the detectors used, or why dlib's was not (stages/lib/imaging/face_detection.py)
    )

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def read(cls, path: Path) -> Manifest:
        data = json.loads(Path(path).read_text())
        return cls(
            data["resolution"],
            [ManifestEntry(**e) for e in data["images"]],
            [Rejection(**r) for r in data["rejected"]],
            data.get("face_detector", ""),
        )

    def metrics(self) -> dict[str, int]:
        """Counts for metrics.json: inputs, accepted, rejected (per reason), focal-point methods and detectors,
        accepted photos without a face."""
        counts = {"num_input": len(self.images) + len(self.rejected), "num_accepted": len(self.images)}
        counts["num_rejected"] = len(self.rejected)
        counts |= {f"num_{m}": sum(e.method == m for e in self.images) for m in METHODS}
        counts |= {f"num_face_{d}": sum(e.detector == d for e in self.images) for d in DETECTORS}
        counts["num_no_face"] = sum(e.method != "face" for e in self.images)
        return counts | {f"num_rejected_{r}": sum(x.reason == r for x in self.rejected) for r in REASONS}
