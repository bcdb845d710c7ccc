"""Metrics of generated images against the subject's prepared photos.

Always computed (no downloaded weights): ``face_detection_rate`` (prep's offline Haar detector, as
:func:`stages.lib.imaging.faces.face_detection_rate`, sharing one detection per image with the embedding crop),
``subject_similarity`` (mean over images of the best cosine similarity to a prepared photo in a hand-made
embedding of the focal crop: hue/saturation/value histogram, a 16 x 16 colour layout and HOG edges -- enough to tell
hair, skin and glasses apart), ``diversity`` (mean pairwise cosine distance between the images of one prompt) and
``subject_latent_rms`` (mean RMS distance of each image's VAE latents to the nearest prepared photo's; lower is
closer). With local weights: the DreamBooth paper's ``clip_i``, ``clip_t`` and ``dino``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from PIL import Image

from stages.lib.imaging.faces import focal_crop
from stages.lib.imaging.images import list_images, to_pixels, to_rgb
from stages.lib.metrics.subject_metrics import nearest_subject_distance

EMBED_SIDE = 64
_HOG = cv2.HOGDescriptor((EMBED_SIDE, EMBED_SIDE), (16, 16), (8, 8), (8, 8), 9)
Images = Sequence[Image.Image]
METRICS = {  # name -> what it measures, in report order
    "subject_similarity": "best cosine similarity of each image's focal-crop embedding (colour histogram, colour "
    "layout, HOG edges) to a prepared photo, averaged; higher = closer to the subject",
    "subject_latent_rms": "RMS distance of each image's VAE latents to the nearest prepared photo's, averaged; "
    "lower = closer to the subject",
    "face_detection_rate": "share of images in which the offline Haar detector finds a face",
    "diversity": "mean pairwise cosine distance between the images of one prompt (same embedding); "
    "higher = more varied",
    "clip_i": "CLIP-I: mean cosine similarity of CLIP image embeddings, generated vs prepared photos "
    "(subject fidelity)",
    "clip_t": "CLIP-T: mean cosine similarity of each image to its prompt without the instance token "
    "(prompt fidelity)",
    "dino": "DINO: mean cosine similarity of DINO embeddings, generated vs prepared photos (subject fidelity)",
}


def load_references(prepared_dir: Path) -> list[Image.Image]:
    """The prepared instance photos (those listed in prep's manifest, else every image of the folder)."""
    manifest = prepared_dir / "manifest.json"
    if manifest.is_file():
        files = [prepared_dir / e["output"] for e in json.loads(manifest.read_text()).get("images", [])]
    else:
        files = list_images(prepared_dir)
    return [to_rgb(Image.open(f)) for f in files]


# -- offline embedding -------------------------------------------------------------------------------------------
def _unit(vector: np.ndarray) -> np.ndarray:
    vector = np.asarray(vector, dtype=np.float64).ravel()
    norm = np.linalg.norm(vector)
    return vector / norm if norm > 0 else vector


@dataclass(frozen=True)
class Analysis:
    """What the offline metrics need of one image: whether a face was found, and its embedding."""

    face: bool
    vector: np.ndarray


def _embed_crop(crop: Image.Image) -> np.ndarray:
    """A unit vector whose cosine similarity is the mean of colour, layout and edge similarities."""
    hsv = cv2.cvtColor(np.asarray(crop), cv2.COLOR_RGB2HSV)
    colour = _unit(np.sqrt(cv2.calcHist([hsv], [0, 1, 2], None, [12, 4, 4], [0, 180, 0, 256, 0, 256])))
    small = np.asarray(crop.resize((16, 16), Image.Resampling.BOX), dtype=np.float64)
    layout = _unit(small - small.mean())
    edges = _unit(_HOG.compute(np.asarray(crop.convert("L"))))
    return np.concatenate([colour, layout, edges]) / np.sqrt(3)


def analyse(image: Image.Image) -> Analysis:
    """One face detection per image: prep's focal crop (face, else saliency, else centre), then the embedding."""
    image = image.convert("RGB")
    focal = focal_crop(image, min_face_fraction=0.0)  # the same detections as face_detection_rate
    box = focal.box
    crop = image.crop((box.left, box.top, box.right, box.bottom)).resize((EMBED_SIDE, EMBED_SIDE))
    return Analysis(focal.method == "face", _embed_crop(crop))


def embed(image: Image.Image) -> np.ndarray:
    return analyse(image).vector


def subject_similarity(vectors: np.ndarray, references: np.ndarray) -> float:
    """Mean over ``vectors`` of the best cosine similarity to a reference embedding (higher: more alike)."""
    return float((vectors @ references.T).max(axis=1).mean())


def diversity(groups: Sequence[np.ndarray]) -> float | None:
    """Mean pairwise cosine distance within each group (one prompt's embeddings); None without any pair."""
    values = [1.0 - float(a @ b) for group in groups for a, b in combinations(group, 2)]
    return float(np.mean(values)) if values else None


@torch.no_grad()
def encode_references(vae: Any, images: Images, height: int, width: int, batch_size: int = 8) -> torch.Tensor:
    """Unscaled VAE latent means of ``images`` resized to the generated size (for ``subject_latent_rms``)."""
    param = next(vae.parameters())
    means = []
    for start in range(0, len(images), batch_size):
        pixels = to_pixels(images[start : start + batch_size], (width, height)).to(param.device, param.dtype)
        means.append(vae.encode(pixels).latent_dist.mean.float().cpu())
    return torch.cat(means)


# -- CLIP / DINO (local weights only) ------------------------------------------------------------------------
def _unit_rows(embeddings: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(embeddings.float(), dim=-1).cpu()


def _pooled(output: Any) -> torch.Tensor:
    """transformers 5 returns model outputs from get_*_features; older versions return the tensor."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class ClipScorer:
    """CLIP image and text embeddings from a local CLIPModel + CLIPProcessor folder."""

    def __init__(self, path: str | Path, device: torch.device | str = "cpu") -> None:
        from transformers import CLIPModel, CLIPProcessor

        self.model = CLIPModel.from_pretrained(path, local_files_only=True).eval().to(device)
        self.processor = CLIPProcessor.from_pretrained(path, local_files_only=True)

    @torch.no_grad()
    def images(self, images: Images) -> torch.Tensor:
        inputs = self.processor(images=list(images), return_tensors="pt").to(self.model.device)
        return _unit_rows(_pooled(self.model.get_image_features(**inputs)))

    @torch.no_grad()
    def texts(self, texts: Sequence[str]) -> torch.Tensor:
        inputs = self.processor(text=list(texts), return_tensors="pt", padding=True, truncation=True)
        return _unit_rows(_pooled(self.model.get_text_features(**inputs.to(self.model.device))))


class DinoScorer:
    """DINO (v2 or v1) CLS embeddings from a local AutoModel + AutoImageProcessor folder."""

    def __init__(self, path: str | Path, device: torch.device | str = "cpu") -> None:
        from transformers import AutoImageProcessor, AutoModel

        self.model = AutoModel.from_pretrained(path, local_files_only=True).eval().to(device)
        self.processor = AutoImageProcessor.from_pretrained(path, local_files_only=True)

    @torch.no_grad()
    def images(self, images: Images) -> torch.Tensor:
        inputs = self.processor(images=list(images), return_tensors="pt").to(self.model.device)
        out = self.model(**inputs)
        cls = (
            out.pooler_output
            if getattr(out, "pooler_output", None) is not None
            else out.last_hidden_state[:, 0]
        )
        return _unit_rows(cls)


def load_scorer(cls: type, key: str, path: str, device: torch.device | str = "cpu") -> tuple[Any, str | None]:
    """``cls(path, device)`` or, when that is not possible, None and the reason the metric is skipped."""
    if not path:
        return None, f"{key} is empty: set it to a local folder with the model weights and processor"
    if not Path(path).is_dir():
        return None, f"{key}={path}: no such folder"
    try:
        return cls(path, device), None
    except Exception as err:  # a folder without usable weights must not stop the comparison
        return None, f"{key}={path}: cannot be loaded ({type(err).__name__}: {err})"


def without_token(prompt: str, token: str) -> str:
    """The prompt CLIP-T scores: the rare instance token removed ("a photo of sks man" -> "a photo of man")."""
    return re.sub(rf"\s*\b{re.escape(token)}\b", "", prompt).strip() if token else prompt


def _flat(images: dict[str, list[Image.Image]]) -> list[Image.Image]:
    return [im for group in images.values() for im in group]


# -- the suite ------------------------------------------------------------------------------------------------
@dataclass
class MetricSuite:
    """Scores each variant's images against the prepared photos; records what was computed or skipped."""

    references: list[Image.Image]
    reference_latents: torch.Tensor | None = None
    clip: ClipScorer | None = None
    dino: DinoScorer | None = None
    instance_token: str = ""
    skipped: dict[str, str] = field(default_factory=dict)  # metric -> why it was not computed
    _cache: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def create(
        cls,
        references: list[Image.Image],
        instance_token: str = "",
        clip_path: str = "",
        dino_path: str = "",
        device: torch.device | str = "cpu",
    ) -> MetricSuite:
        """The suite with CLIP / DINO loaded from local folders; metrics whose model does not load are skipped."""
        clip, clip_reason = load_scorer(ClipScorer, "compare.clip_model_path", clip_path, device)
        dino, dino_reason = load_scorer(DinoScorer, "compare.dino_model_path", dino_path, device)
        suite = cls(references, clip=clip, dino=dino, instance_token=instance_token)
        suite.skipped |= {name: clip_reason for name in ("clip_i", "clip_t") if clip_reason}
        suite.skipped |= {"dino": dino_reason} if dino_reason else {}
        return suite

    def _reference(self, name: str, fn: Any) -> Any:
        if name not in self._cache:
            self._cache[name] = fn(self.references)
        return self._cache[name]

    def score(
        self, images: dict[str, list[Image.Image]], latents: torch.Tensor | None = None
    ) -> dict[str, float]:
        """Metrics of one variant; ``images`` maps each prompt to its images."""
        analyses = {prompt: [analyse(im) for im in group] for prompt, group in images.items()}
        flat = [a for group in analyses.values() for a in group]
        references = self._reference("embed", lambda refs: np.stack([embed(im) for im in refs]))
        metrics = {
            "face_detection_rate": float(np.mean([a.face for a in flat])),
            "subject_similarity": subject_similarity(np.stack([a.vector for a in flat]), references),
        }
        spread = diversity([np.stack([a.vector for a in group]) for group in analyses.values()])
        if spread is not None:
            metrics["diversity"] = spread
        else:
            self.skipped["diversity"] = "one image per prompt: no pairs to compare"
        if latents is not None and self.reference_latents is not None:
            metrics["subject_latent_rms"] = nearest_subject_distance(latents, self.reference_latents)
        if self.clip is not None:
            metrics.update(self._clip_scores(images))
        if self.dino is not None:
            refs = self._reference("dino", self.dino.images)
            metrics["dino"] = float((self.dino.images(_flat(images)) @ refs.T).mean())
        return metrics

    def _clip_scores(self, images: dict[str, list[Image.Image]]) -> dict[str, float]:
        assert self.clip is not None
        embeds = self.clip.images(_flat(images))
        refs = self._reference("clip", self.clip.images)
        texts = self.clip.texts([without_token(p, self.instance_token) for p in images])
        owner = torch.tensor([k for k, group in enumerate(images.values()) for _ in group])
        return {
            "clip_i": float((embeds @ refs.T).mean()),
            "clip_t": float((embeds * texts[owner]).sum(dim=-1).mean()),
        }
