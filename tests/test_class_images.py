"""Stage `class_images`: seeded per index, independent of batching, resumable, invalidated by a new fingerprint."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stages import base, class_images
from stages.lib.config.schema import PipelineConfig


@pytest.fixture
def base_dir(tiny_cfg: PipelineConfig, tmp_path: Path) -> Path:
    tiny_cfg.class_images.num_class_images = 5
    tiny_cfg.class_images.num_inference_steps = 2
    tiny_cfg.class_images.sample_batch_size = 2
    return base.run(tiny_cfg, tmp_path / "base", tmp_path / "r") and tmp_path / "base"


def _pixels(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(Image.open(p), dtype=np.int16) for p in sorted(folder.glob("class_*.png"))}


def _bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("class_*.png"))}


def test_generates_exactly_n_and_batching_does_not_change_images(tiny_cfg, base_dir, tmp_path) -> None:
    metrics = class_images.run(tiny_cfg, base_dir, tmp_path / "a", tmp_path / "ra")
    assert metrics["num_generated"] == 5 and len(_bytes(tmp_path / "a")) == 5
    assert (tmp_path / "ra" / "sample_grid.png").is_file()
    tiny_cfg.class_images.sample_batch_size = 3
    class_images.run(tiny_cfg, base_dir, tmp_path / "b", tmp_path / "rb")
    a, b = _pixels(tmp_path / "a"), _pixels(tmp_path / "b")
    assert a.keys() == b.keys()
    # batched matmuls round differently in the last float bits; images agree to within one grey level
    assert all(np.abs(a[k] - b[k]).max() <= 1 for k in a), {k: np.abs(a[k] - b[k]).max() for k in a}
    images = _bytes(tmp_path / "a")
    assert len(set(images.values())) == 5, "each index has its own seed"


def test_rerun_generates_only_missing_or_broken_images(tiny_cfg, base_dir, tmp_path) -> None:
    out = tmp_path / "c"
    class_images.run(tiny_cfg, base_dir, out, tmp_path / "r")
    original = _bytes(out)
    (out / class_images.image_name(1)).unlink()
    (out / class_images.image_name(3)).write_bytes(b"truncated")
    (out / ".class_00004.png.tmp.png").write_bytes(b"half written by a killed run")
    metrics = class_images.run(tiny_cfg, base_dir, out, tmp_path / "r")
    assert metrics["num_generated"] == 2 and metrics["num_reused"] == 3
    assert _bytes(out) == original
    assert not list(out.glob(".*tmp*"))


def test_work_folder_survives_dvc_removing_the_output(tiny_cfg, base_dir, tmp_path) -> None:
    """As dvc.yaml runs it: made in the work folder, copied to the output; DVC removes the output before a rerun
    and the work folder still holds every image, so nothing is generated again."""
    out, work = tmp_path / "out", tmp_path / "work"
    first = class_images.run(tiny_cfg, base_dir, out, tmp_path / "r", work)
    assert first["num_generated"] == 5 and _bytes(out) == _bytes(work) and len(_bytes(out)) == 5
    assert (out / class_images.FINGERPRINT_FILE).is_file()
    images = _bytes(out)
    shutil.rmtree(out)  # what `dvc repro` does to a non-persist output
    (work / class_images.image_name(2)).unlink()  # and a killed run's missing image
    again = class_images.run(tiny_cfg, base_dir, out, tmp_path / "r", work)
    assert again["num_generated"] == 1 and again["num_reused"] == 4
    assert _bytes(out) == images and not list(tmp_path.glob(".out.*"))


def test_more_images_extend_and_fewer_trim(tiny_cfg, base_dir, tmp_path) -> None:
    out = tmp_path / "d"
    class_images.run(tiny_cfg, base_dir, out, tmp_path / "r")
    tiny_cfg.class_images.num_class_images = 7
    assert class_images.run(tiny_cfg, base_dir, out, tmp_path / "r")["num_generated"] == 2
    tiny_cfg.class_images.num_class_images = 4
    assert class_images.run(tiny_cfg, base_dir, out, tmp_path / "r")["num_generated"] == 0
    assert sorted(_bytes(out)) == [class_images.image_name(i) for i in range(4)]


def test_changed_prompt_regenerates_everything(tiny_cfg, base_dir, tmp_path) -> None:
    out = tmp_path / "e"
    class_images.run(tiny_cfg, base_dir, out, tmp_path / "r")
    tiny_cfg.data.class_prompt = "a photo of woman face"
    assert class_images.run(tiny_cfg, base_dir, out, tmp_path / "r")["num_generated"] == 5
