"""prep's ``manifest.json``: the accepted crops (with crop and face boxes) and the rejected inputs.

Written by the prep stage, read by training (face-weighted loss) and reports.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

MANIFEST = "manifest.json"
METHODS = ("face", "saliency", "center")
REASONS = (
    "corrupt",
    "not_an_image",
    "unsupported_format",
    "too_small",
    "blank",
    "duplicate",
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


@dataclass
class Manifest:
    """``manifest.json``: what prep accepted and rejected."""

    resolution: int
    images: list[ManifestEntry] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def read(cls, path: Path) -> Manifest:
        data = json.loads(Path(path).read_text())
        return cls(
            data["resolution"],
            [ManifestEntry(**e) for e in data["images"]],
            [Rejection(**r) for r in data["rejected"]],
        )

    def metrics(self) -> dict[str, int]:
        """Counts for metrics.json: inputs, accepted, rejected (per reason) and focal-point methods."""
        counts = {"num_input": len(self.images) + len(self.rejected), "num_accepted": len(self.images)}
        counts["num_rejected"] = len(self.rejected)
        counts |= {f"num_{m}": sum(e.method == m for e in self.images) for m in METHODS}
        return counts | {f"num_rejected_{r}": sum(x.reason == r for x in self.rejected) for r in REASONS}
