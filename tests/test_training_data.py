"""Image work on threads (stages/lib/runtime/threads.py) changes nothing but the time: training images decode to
the same tensor in file order, the sample subject's photos come out byte for byte the same, and a failed
background write is raised."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from PIL import Image

from stages.lib.config.schema import SampleSubjectConfig
from stages.lib.runtime import threads
from stages.lib.training import data
from stages.sample_subject import write_subject


def test_threaded_reading_gives_the_images_in_order(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(13):
        size = (48 + 4 * i, 40 + 8 * (i % 3))  # non-square: centre-cropped, then resized
        path = tmp_path / f"{i:02d}.png"
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
        paths.append(path)
    monkeypatch.setattr(threads.os, "cpu_count", lambda: 4)
    assert threads.worker_count(len(paths)) == 4
    threaded = data.read_images(paths, 32)
    one_by_one = torch.stack([data._read_image(p, 32) for p in paths])
    assert threaded.shape == (13, 3, 32, 32)
    assert torch.equal(threaded, one_by_one)
    assert len({float(img.mean()) for img in threaded}) == 13  # distinct images, so order is checked
    monkeypatch.setattr(threads.os, "cpu_count", lambda: 1)
    assert threads.worker_count(len(paths)) == 1
    assert torch.equal(data.read_images(paths, 32), one_by_one)


def test_the_sample_subject_is_the_same_on_any_number_of_threads(tmp_path, monkeypatch) -> None:
    cfg = SampleSubjectConfig(num_images=7, min_size=96, max_size=160)
    written = {}
    for cpus in (1, 4):
        monkeypatch.setattr(threads.os, "cpu_count", lambda cpus=cpus: cpus)
        folder = tmp_path / f"cpus{cpus}"
        folder.mkdir()
        paths = write_subject(cfg, folder, instance_prompt="a photo of sks person")
        assert [p.name for p in paths] == sorted(p.name for p in paths) and len(paths) == 7
        written[cpus] = {p.name: p.read_bytes() for p in sorted(folder.iterdir())}
    assert written[1] == written[4]
    assert any(name.endswith(".txt") for name in written[1]) and len(set(written[1].values())) == len(
        written[1]
    )


def test_background_jobs_raise_a_failed_call_and_finish_the_rest(tmp_path) -> None:
    done: list[int] = []
    all_queued = threading.Event()

    def job(i: int) -> None:
        if i == 2:
            all_queued.wait(timeout=30)  # fails once every job is queued: close() must raise it
            raise OSError(f"disk full at {i}")
        (tmp_path / f"{i}.txt").write_text(str(i))
        done.append(i)

    with pytest.raises(OSError, match="disk full at 2"):
        with threads.BackgroundJobs(workers=2) as jobs:
            for i in range(5):
                jobs.submit(job, i)
            all_queued.set()
    assert sorted(done) == [0, 1, 3, 4] and len(list(tmp_path.iterdir())) == 4
    assert threads.map_in_threads(lambda x: x * x, range(20), limit=3) == [x * x for x in range(20)]
