"""stages/lib/runtime/timings.py: nested phases count once, the report adds up, the JSON lands where asked."""

from __future__ import annotations

import json
import os
import pstats
import subprocess
import sys
import time
from pathlib import Path

from PIL import Image

from stages.lib.config.loader import save_params
from stages.lib.config.schema import PipelineConfig
from stages.lib.runtime.timings import PROFILE_ENV, TIMINGS_ENV, StageClock, summary_line, write_report
from tests.conftest import PROJECT_ROOT


def test_nested_phases_count_their_own_time_once() -> None:
    clock = StageClock(time.perf_counter())
    time.sleep(0.05)  # startup: before the first phase
    with clock.phase("train"):
        time.sleep(0.05)
        with clock.phase("validation"):
            time.sleep(0.1)
        time.sleep(0.05)
    with clock.phase("validation"):
        time.sleep(0.05)
    report = clock.report()
    assert 0.04 <= report["startup"] < 0.1
    assert 0.09 <= report["train"] < 0.15, "train without the validation nested in it"
    assert 0.14 <= report["validation"] < 0.25, "both validations, accumulated"
    parts = sum(v for k, v in report.items() if k != "total")
    assert abs(parts - report["total"]) < 1e-6, "startup + phases + other = total"


def test_summary_line_and_json(tmp_path: Path) -> None:
    report = {"startup": 6.1, "load": 2.34, "train": 40.0, "other": 0.01, "total": 48.45}
    assert summary_line(report) == "total 48.5 s: train 40.0, startup 6.1, load 2.3"
    assert write_report(report, env={}) is None
    target = tmp_path / "logs" / "dreambooth.timings.json"
    assert write_report(report, env={TIMINGS_ENV: str(target)}) == target
    assert json.loads(target.read_text())["load"] == 2.34


def test_a_stage_process_reports_its_phases(tmp_path: Path) -> None:
    """A real stage (prep on two generated photos) writes its breakdown, startup included, and its host profile."""
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(2):
        Image.effect_noise((96, 96), 40 + i).convert("RGB").save(photos / f"p{i}.png")
    cfg = PipelineConfig()
    cfg.prep.resolution = 64
    cfg.prep.require_face = False
    cfg.tracking.enabled = False
    save_params(cfg, tmp_path / "params.yaml")
    target = tmp_path / "timings.json"
    done = subprocess.run(
        [sys.executable, "-m", "stages", "prep", "--params", str(tmp_path / "params.yaml"), "--input", str(photos),
         "--output", str(tmp_path / "prepared"), "--reports", str(tmp_path / "reports")],
        cwd=PROJECT_ROOT, env={**os.environ, TIMINGS_ENV: str(target), PROFILE_ENV: str(tmp_path / "prep.prof")},
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(target.read_text())
    assert report["startup"] > 0.1, "the interpreter and imports before the first phase"
    assert report["config"] > 0
    assert report["total"] >= report["startup"] + report["config"]
    assert "wall time total" in done.stderr
    profiled = {(Path(file).name, name) for file, _, name in pstats.Stats(str(tmp_path / "prep.prof")).stats}
    assert ("prep.py", "run") in profiled, "the stage's own code ran under the profiler"
