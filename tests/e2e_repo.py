"""The end-to-end tests' project clone: a fresh git repo holding exactly what a clone of the project holds, after
`dvc repro` on the tiny default (shortened, see below), offline.

It is built once per test session, with a second copy made at once: the two end-to-end modules run `dvc exp`
commands that change their clone, each in its own. Under `pytest -n 2` (make test) the first worker that asks
builds both and a worker that asks meanwhile waits for them (a file lock in the session's shared temporary
folder), so the two modules' tests run on both workers once the build is done. A test that reads the clone only up
to DreamBooth (test_pipeline_prior.py) gets it as soon as the build has written that model: `dvc repro dreambooth`
runs first and leaves a marker. A failed build is recorded, and every later request fails at once with the same
message instead of building again.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from filelock import FileLock, Timeout

from .conftest import PROJECT_ROOT, XDIST_WORKER

VENV_BIN = Path(sys.executable).parent
# The default pretrains the miniature for 4-5 minutes and trains DreamBooth 2400 steps with EMA (3 min); the
# end-to-end clone pretrains 200 steps on 1000 world images (SHORT_TRAINING), uses the reference 800 DreamBooth
# steps and the profile's 600-step ControlNet: still enough for DreamBooth's effect on the subject, prior
# preservation's and the ControlNet's to show (on this weak base 2400 steps bind the subject no better: subject rate
# 0.04 against 0.01). Measured at the suite's one torch thread (every stage is bit-reproducible at a given thread
# count, not across counts): this build passes with subject match 0.57-0.62 against the base's 0.37,
# prior preservation's class diversity 0.64 against 0.44 and ControlNet edge F1 gains +0.30 / +0.31; pretraining
# 150 steps leaves the subject unbound (match 0.40-0.42 against 0.32); 600 DreamBooth steps (with a 500-step
# ControlNet) leave no drift to measure without prior preservation (class subject match 0.36 against 0.34) and an
# edge F1 gain of +0.032 only (with the photos' own maps at conditioning scale 1).
PROFILE_EDITS = (  # (profile text, replacement): each must occur exactly once in conf/profile/tiny.yaml
    ("  max_train_steps: 2400\n  use_ema: true\n", "  max_train_steps: 800\n  use_ema: false\n"),
)
SHORT_TRAINING = """
model:
  tiny:
    world:
      num_images: 1000
      reader_steps: 300
    pretrain:
      max_train_steps: 200
      checkpointing_steps: 100
      validation_steps: 200
      num_validation_images: 2
"""
PRETRAIN_STEPS = 200


def sh(cwd: Path, *cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` in ``cwd`` with the project's virtual environment first on PATH, offline."""
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}", "HF_HUB_OFFLINE": "1"}
    env.pop("DVC_ROOT", None)
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=1200)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
        )
    return proc


def build_clone(root: Path, dreambooth_done: Callable[[], None] = lambda: None) -> None:
    """Copy the project's git-visible files into ``root``, shorten the tiny profile, commit, `dvc repro`
    (calling ``dreambooth_done`` once the DreamBooth model and everything it needs are written)."""
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    for name in files:
        if (PROJECT_ROOT / name).is_file():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(PROJECT_ROOT / name, root / name)
    profile = root / "conf/profile/tiny.yaml"  # shorter training: the suite's time budget
    text = profile.read_text()
    for old, new in PROFILE_EDITS:
        assert text.count(old) == 1, (
            f"conf/profile/tiny.yaml: {old.strip()!r} moved; update tests/e2e_repo.py"
        )
        text = text.replace(old, new)
    profile.write_text(text + SHORT_TRAINING)
    sh(root, "python", "-m", "stages.compose")
    sh(root, "git", "init", "-q")
    sh(root, "git", "add", "-A")
    sh(root, "git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "clone")
    log = repro_log(root)
    proc = sh(root, "dvc", "repro", "dreambooth")
    log.write_text(proc.stdout + proc.stderr)
    dreambooth_done()
    proc = sh(root, "dvc", "repro")
    log.write_text(log.read_text() + proc.stdout + proc.stderr)


def repro_log(root: Path) -> Path:
    """What the build's `dvc repro` commands printed (stdout and stderr, not a terminal), beside the clone."""
    return root.with_name(f"{root.name}.repro.log")


CLONES = ("e2e_clone", "e2e_clone_copy")


def shared_clone(
    tmp_path_factory: pytest.TempPathFactory, which: int, up_to_dreambooth: bool = False
) -> Path:
    """Clone ``which`` (0 or 1) of the session's two identical built clones; both are built here if no process
    of this session is building them. ``up_to_dreambooth`` returns clone 0 as soon as another process's build
    has written the DreamBooth model, for tests that read no later output (they run beside the rest of the
    build on a worker that would otherwise wait for it)."""
    shared = tmp_path_factory.getbasetemp()
    if XDIST_WORKER:
        shared = shared.parent  # the same folder for every xdist worker of the session
    roots = [shared / name for name in CLONES]
    failed, done = shared / "e2e_clone.failed", shared / "e2e_clone.done"
    partial = shared / "e2e_clone.dreambooth_done"
    lock = FileLock(str(shared / "e2e_clone.lock"))
    while up_to_dreambooth and not failed.is_file():
        if partial.is_file():
            return roots[0]
        try:
            lock.acquire(timeout=0)
        except Timeout:  # another process is building
            time.sleep(2)
            continue
        lock.release()  # nobody is building: build below
        break
    with lock:
        if failed.is_file():
            raise AssertionError(
                f"the end-to-end clone failed to build (in another test):\n{failed.read_text()}"
            )
        if not done.is_file():
            partial.unlink(missing_ok=True)
            for root in roots:
                shutil.rmtree(root, ignore_errors=True)
            roots[0].mkdir()
            try:
                build_clone(roots[0], lambda: partial.write_text("built up to dreambooth\n"))
                shutil.copytree(roots[0], roots[1], symlinks=True)
            except BaseException as err:
                failed.write_text(str(err) or type(err).__name__)
                raise
            done.write_text("built\n")
    return roots[which]
