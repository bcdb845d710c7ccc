"""Training images are decoded on several threads (stages/lib/training/data.py): the same tensor, in file order,
as decoding them one by one."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from stages.lib.training import data


def test_threaded_reading_gives_the_images_in_order(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(13):
        size = (48 + 4 * i, 40 + 8 * (i % 3))  # non-square: centre-cropped, then resized
        path = tmp_path / f"{i:02d}.png"
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
        paths.append(path)
    monkeypatch.setattr(data.os, "cpu_count", lambda: 4)
    threaded = data.read_images(paths, 32)
    one_by_one = torch.stack([data._read_image(p, 32) for p in paths])
    assert threaded.shape == (13, 3, 32, 32)
    assert torch.equal(threaded, one_by_one)
    assert len({float(img.mean()) for img in threaded}) == 13  # distinct images, so order is checked
    monkeypatch.setattr(data, "READ_WORKERS", 1)
    assert torch.equal(data.read_images(paths, 32), one_by_one)
