"""Small shared builders for the training tests: a tiny base model, a synthetic subject, class images."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from stages import base, class_images
from stages.lib.config.schema import PipelineConfig
from stages.lib.imaging.manifest import MANIFEST, Manifest, ManifestEntry
from stages.lib.training.finetune import FinetunePaths

from .conftest import without_pretraining

RES = 64


@dataclass
class TinyWorld:
    cfg: PipelineConfig
    root: Path
    base_dir: Path
    prepared: Path
    class_dir: Path

    def paths(self, name: str) -> FinetunePaths:
        return FinetunePaths(
            self.prepared, self.class_dir, self.root / "ckpt" / name, self.root / "reports" / name
        )


def write_subject(folder: Path, count: int = 6) -> Path:
    """A distinctive, consistent 'subject': an orange face box on a blue field, slightly shifted per image."""
    folder.mkdir(parents=True, exist_ok=True)
    manifest = Manifest(resolution=RES)
    for i in range(count):
        a = np.zeros((RES, RES, 3), np.uint8)
        a[:] = (30, 70, 170)
        x, y = 16 + (i % 3) * 2, 14 + (i % 2) * 2
        a[y : y + 34, x : x + 28] = (240, 150, 60)
        a[y + 10 : y + 14, x + 6 : x + 10] = (20, 20, 20)
        a[y + 10 : y + 14, x + 18 : x + 22] = (20, 20, 20)
        Image.fromarray(a).save(folder / f"{i:03d}.png")
        box = [x, y, x + 28, y + 34]
        name = f"{i:03d}.png"
        manifest.images.append(
            ManifestEntry(name, name, "", "", [RES, RES], [0, 0, RES, RES], "face", box, box)
        )
    manifest.write(folder / MANIFEST)
    return folder


def tiny_training_cfg(cfg: PipelineConfig, steps: int = 30) -> PipelineConfig:
    """Shrink the tiny profile further so that each training test takes a few seconds (no pretraining)."""
    without_pretraining(cfg)
    # the random tiny model learns the synthetic subject in a few dozen steps at these rates (the profile's are
    # tuned for the pretrained miniature)
    cfg.dreambooth.learning_rate, cfg.lora.train.learning_rate = 1e-3, 5e-3
    # options are tested one at a time from UNet-only training without EMA
    cfg.dreambooth.train_text_encoder = cfg.dreambooth.use_ema = False
    for train in (cfg.dreambooth, cfg.lora.train):
        train.max_train_steps = steps
        train.checkpointing_steps = 10
        train.validation_steps = steps
        train.num_validation_images = 1
        train.validation_inference_steps = 2
        train.optimizer = "adamw"
    cfg.class_images.num_class_images = 6
    cfg.class_images.num_inference_steps = 3
    cfg.class_images.sample_batch_size = 3
    return cfg


def build_world(cfg: PipelineConfig, root: Path) -> TinyWorld:
    tiny_training_cfg(cfg)
    base_dir = root / "models" / "base"
    base.run(cfg, base_dir, root / "reports" / "base")
    class_dir = root / "data" / "class_images"
    class_images.run(cfg, base_dir, class_dir, root / "reports" / "class_images")
    return TinyWorld(cfg, root, base_dir, write_subject(root / "data" / "prepared"), class_dir)


def new_world(factory, name: str, tracking_uri: str | None = None) -> TinyWorld:
    """A tiny world in a fresh temporary folder, from the tiny profile composed like DVC does."""
    from stages.compose import compose  # imports DVC, which a CUDA-only test setup may lack
    from stages.lib.config.loader import load_config

    from .conftest import PROJECT_ROOT

    root = factory.mktemp(name)
    cfg = load_config(compose(root / "params.yaml", [], root=PROJECT_ROOT))
    cfg.tracking.enabled = tracking_uri is not None
    cfg.tracking.uri = tracking_uri or ""
    return build_world(cfg, root)
