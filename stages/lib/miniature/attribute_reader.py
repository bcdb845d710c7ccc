"""The attribute reader: a small CNN trained on the miniature world that tells what a generated image shows.

One classification head per attribute of ``stages.lib.miniature.world.ATTRIBUTES`` (identity, scene, style). It is trained
on world images passed through the tiny VAE with noise added to their latents, i.e. on what the tiny pipeline's
generations look like, and saved next to the base model as safetensors + JSON.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from stages.lib.errors import StageError
from stages.lib.imaging.images import to_pixels
from stages.lib.miniature.world import ATTRIBUTES, WorldImage

READER_DIR = "attribute_reader"
WEIGHTS = "reader.safetensors"
CONFIG = "reader.json"
INPUT_SIZE = 32


class AttributeReader(nn.Module):
    """Four strided convolutions, a spatial feature vector and one linear head per attribute."""

    def __init__(self, attributes: dict[str, Sequence[str]] = ATTRIBUTES, width: int = 32) -> None:
        super().__init__()
        self.attributes = {name: list(classes) for name, classes in attributes.items()}
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1), nn.GELU(),
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(2 * w, 2 * w, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(2 * w, 4 * w, 3, stride=2, padding=1), nn.GELU(),
            nn.Flatten(), nn.Dropout(0.1), nn.Linear(4 * w * (INPUT_SIZE // 8) ** 2, 128), nn.GELU(),
        )  # fmt: skip
        self.heads = nn.ModuleDict({name: nn.Linear(128, len(c)) for name, c in self.attributes.items()})

    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits per attribute for images in [-1, 1] of any square size."""
        x = F.interpolate(pixels, size=(INPUT_SIZE, INPUT_SIZE), mode="area")
        h = self.features(x)
        return {name: head(h) for name, head in self.heads.items()}

    @torch.no_grad()
    def read(self, images: Sequence[Image.Image] | torch.Tensor) -> list[dict[str, str]]:
        """The most likely class of every attribute, per image."""
        pixels = images if isinstance(images, torch.Tensor) else to_pixels(images, 2 * INPUT_SIZE)
        self.eval()
        logits = self(pixels)
        picks = {name: logits[name].argmax(1).tolist() for name in self.attributes}
        return [{n: self.attributes[n][picks[n][i]] for n in self.attributes} for i in range(pixels.shape[0])]


def label_tensors(items: Sequence[WorldImage]) -> dict[str, torch.Tensor]:
    """The reader's training targets: every image's class index per attribute."""
    return {name: torch.tensor([item.labels()[name] for item in items]) for name in ATTRIBUTES}


@dataclass
class ReaderTraining:
    """How the reader is trained (part of model.tiny.world)."""

    steps: int = 300
    batch_size: int = 64
    learning_rate: float = 2e-3
    seed: int = 0


def train_reader(
    pixels: torch.Tensor, labels: dict[str, torch.Tensor], cfg: ReaderTraining, holdout: int
) -> tuple[AttributeReader, dict[str, float]]:
    """Train on all but the last ``holdout`` images; returns the reader and its held-out accuracy per attribute."""
    torch.manual_seed(cfg.seed)
    reader = AttributeReader()
    train_n = pixels.shape[0] - holdout
    if train_n < cfg.batch_size or holdout < 1:
        raise StageError(f"attribute reader: {pixels.shape[0]} images leave too few to train and hold out")
    opt = torch.optim.AdamW(reader.parameters(), cfg.learning_rate, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.learning_rate, total_steps=cfg.steps)
    g = torch.Generator().manual_seed(cfg.seed)
    reader.train()
    for _ in tqdm(range(cfg.steps), desc="attribute reader", unit="step"):
        idx = torch.randint(train_n, (cfg.batch_size,), generator=g)
        logits = reader(reframe(pixels[idx], g))
        loss = sum(F.cross_entropy(logits[n], labels[n][idx]) for n in reader.attributes)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return reader, accuracy(reader, pixels[train_n:], {n: v[train_n:] for n, v in labels.items()})


def reframe(pixels: torch.Tensor, g: torch.Generator, min_scale: float = 0.8) -> torch.Tensor:
    """A random square crop (side ``min_scale``..1 of the image, anywhere) resized back: prep's crops of real
    photos frame the face a little tighter or looser than the world's renders."""
    size = pixels.shape[-1]
    side = int(size * (min_scale + (1 - min_scale) * float(torch.rand((), generator=g))))
    top, left = (int(torch.randint(size - side + 1, (), generator=g)) for _ in range(2))
    crop = pixels[..., top : top + side, left : left + side]
    return F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False)


@torch.no_grad()
def accuracy(
    reader: AttributeReader, pixels: torch.Tensor, labels: dict[str, torch.Tensor]
) -> dict[str, float]:
    """Share of images whose class is read correctly, per attribute."""
    reader.eval()
    logits = reader(pixels)
    return {n: float((logits[n].argmax(1) == labels[n]).float().mean()) for n in reader.attributes}


def save_reader(reader: AttributeReader, folder: Path, info: dict[str, object]) -> Path:
    """Write ``reader.safetensors`` and ``reader.json`` (attributes and ``info``) into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in reader.state_dict().items()}, folder / WEIGHTS)
    (folder / CONFIG).write_text(json.dumps({"attributes": reader.attributes, **info}, indent=2) + "\n")
    return folder


def load_reader(folder: Path) -> tuple[AttributeReader, dict[str, object]] | None:
    """The reader saved in ``folder`` with its JSON, or None when there is none (e.g. a real SD1.5 base)."""
    folder = Path(folder)
    if not (folder / WEIGHTS).is_file():
        return None
    info = json.loads((folder / CONFIG).read_text())
    reader = AttributeReader(info["attributes"])
    reader.load_state_dict(load_file(folder / WEIGHTS))
    return reader.eval(), info
